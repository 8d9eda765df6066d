"""What lets a model that barely fits train: gradient checkpointing (and LoRA adapters, :mod:`.adapters`).

Gradient checkpointing keeps only each layer's input in the forward pass and recomputes the layer in the backward
pass (transformers' own ``activation_checkpointing_enable``, per ``GradientCheckpointingLayer``). It is always the
non-reentrant ``torch.utils.checkpoint``: the reentrant one crashes under DDP (sentence-transformers' issue #2844,
fixed there the same way). ``torch.utils.checkpoint`` saves the RNG state of the
forward pass and restores it for the recomputation, so dropout draws the same masks twice: the gradient is the one
without checkpointing (``tests/test_memory.py``), also inside GradCache's replayed second pass.
"""

from __future__ import annotations

from torch import nn

from .text import ModelLoadError


def enable_gradient_checkpointing(encoder: nn.Module, name: str) -> None:
    """Non-reentrant activation checkpointing for the transformers model inside ``encoder``; a model that does not
    support it is refused here, before training, in one line."""
    model = encoder.transformers_model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelLoadError(
            f"gradient_checkpointing: {name} ({type(model).__name__}) does not support gradient checkpointing in "
            "transformers; set gradient_checkpointing: false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:  # pragma: no cover - older transformers
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model.config, "use_cache", False):  # a decoder's key/value cache serves generation, not training
        model.config.use_cache = False
