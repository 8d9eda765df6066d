"""LoRA adapters through ``peft``: only the adapters train, checkpoints hold only them, exports are merged.

``lora_r > 0`` injects LoRA layers (``peft.inject_adapter_in_model``, in place: the pipeline stays a
``SentenceTransformer`` whose parameter names gain ``base_layer`` / ``lora_A`` / ``lora_B``) into
``lora_target_modules`` of the transformers model (unset: peft's default for the model type, the attention's query
and value maps); every other weight is frozen. The optimizer sees only the adapters, so its state is theirs only, and
a checkpoint's ``model.safetensors`` holds only the trainable tensors (:func:`trainable_tensors`): the frozen base is
rebuilt at resume as it was built at the start (the same pretrained folder, or the same seed for a model from
scratch). ``final/`` and ``best/`` are written with the adapters merged into the base weights (``lora_export:
merged``, the default): a plain model folder that ``SentenceTransformer(path)`` loads without peft. ``lora_export:
adapter`` writes the adapters alone (peft's ``adapter_config.json`` naming the base, ``adapter_model.safetensors``):
``SentenceTransformer(path)`` loads the base and applies them, with peft installed.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

LORA_EXPORTS = ("merged", "adapter")  # what final/ and best/ hold of a LoRA run (lora_export)


def add_lora(encoder: nn.Module, settings: dict, name: str) -> None:
    """Inject LoRA adapters as ``settings`` (a run's model settings) say and freeze every other weight; target
    modules the model does not have are refused in one line, naming those it has."""
    from peft import LoraConfig, inject_adapter_in_model

    from .text import ModelLoadError

    model = encoder.transformers_model
    config = LoraConfig(r=settings["lora_r"], lora_alpha=settings.get("lora_alpha", 16.0),
                        lora_dropout=settings.get("lora_dropout", 0.0),
                        target_modules=settings.get("lora_target_modules") or None,
                        base_model_name_or_path=adapter_base(settings))  # fmt: skip
    try:
        inject_adapter_in_model(config, model)
    except ValueError as err:  # peft: no target module matched, or none known for this model type
        linear = sorted({part.rsplit(".", 1)[-1] for part, m in model.named_modules() if isinstance(m, nn.Linear)})
        reason = str(err).strip().splitlines()[0]
        raise ModelLoadError(f"lora_target_modules: {reason} ({name}'s linear modules: {', '.join(linear)})") from None
    for parameter_name, parameter in encoder.named_parameters():
        parameter.requires_grad_(".lora_" in parameter_name)  # the adapters only; pooling heads stay frozen too


def adapter_base(settings: dict) -> str | None:
    """What an adapter-only export names as its base (``lora_export: adapter``; ``None`` for a merged export): the
    hub id as the run named it (a packaged model's hub id), or a folder's absolute path."""
    from ..export import hub_id_of
    from .text import resolve_model_path

    if settings.get("lora_export", "merged") != "adapter":
        return None
    name = settings["model_name_or_path"]  # the config check refuses an adapter export of a model from scratch
    return hub_id_of(name) or os.path.abspath(os.path.expanduser(resolve_model_path(name)))


def saved_adapter_base(encoder: nn.Module) -> str | None:
    """The base that ``encoder``'s saved adapters name, where it is saved as its adapters alone: adapters whose peft
    config names their base (set by :func:`add_lora` for ``lora_export: adapter``, or read from such a folder);
    ``None``: saved whole (merged, or without adapters)."""
    configs = getattr(encoder.transformers_model, "peft_config", None) or {}
    bases = {config.base_model_name_or_path for config in configs.values()}
    return bases.pop() if has_adapters(encoder) and len(bases) == 1 and None not in bases else None


@contextlib.contextmanager
def adapter_only_save(model: nn.Module):
    """Within this block transformers' ``save_pretrained`` of ``model`` writes the adapters alone (peft's files)."""
    kept = model._hf_peft_config_loaded  # transformers' flag, False for adapters injected by peft directly
    model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        model._hf_peft_config_loaded = kept


def has_adapters(model: nn.Module) -> bool:
    """Whether ``model`` holds peft adapter layers (peft imported only where a run asked for them)."""
    if "peft" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def trainable_tensors(model: nn.Module) -> dict[str, Tensor] | None:
    """What a checkpoint keeps of a model with adapters: its trainable tensors by name (``None``: no adapters, the
    whole model is kept)."""
    if not has_adapters(model):
        return None
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_model_weights(model: nn.Module, file: Path) -> None:
    """The model's weights in safetensors: all of them, or, for a model with LoRA adapters, the adapters only (what
    trains; the frozen base is rebuilt as the run built it)."""
    from safetensors.torch import save_file, save_model

    adapters = trainable_tensors(model)
    if adapters is None:
        save_model(model, str(file))  # handles tied weights
    else:
        # one entry: safetensors writes its metadata in no fixed order, and a checkpoint must be bit-reproducible
        metadata = {"adapters_of_frozen_sha256": frozen_fingerprint(model)}
        save_file({name: tensor.cpu() for name, tensor in adapters.items()}, str(file), metadata=metadata)


def frozen_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the frozen weights (names and bytes), computed once per model: an adapter checkpoint says which
    base it was trained on, so it is never loaded onto another (a changed hub revision, another seed)."""
    import hashlib

    cached = getattr(model, "_simcse_flat_frozen_sha256", None)
    if cached is None:
        digest = hashlib.sha256()
        for name, parameter in sorted(model.named_parameters()):
            if not parameter.requires_grad:
                digest.update(name.encode())
                digest.update(parameter.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        cached = digest.hexdigest()
        model._simcse_flat_frozen_sha256 = cached
    return cached


def load_model_weights(model: nn.Module, file: Path) -> None:
    """Read what :func:`save_model_weights` wrote into ``model`` (on the CPU, then copied into the parameters);
    a file that does not fit raises ``RuntimeError``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, load_model

    with safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata() or {}
    holds_adapters = "adapters_of_frozen_sha256" in metadata
    adapters = trainable_tensors(model)
    if not holds_adapters and adapters is None:
        load_model(model, str(file), strict=True)
        return
    if adapters is None or not holds_adapters:
        raise RuntimeError("the file holds LoRA adapters and the model has none, or the other way round (lora_r)")
    tensors = load_file(str(file))
    if set(tensors) != set(adapters):
        raise RuntimeError(f"adapter tensors {sorted(set(tensors) ^ set(adapters))[:3]} in only one of file and model")
    if metadata["adapters_of_frozen_sha256"] != frozen_fingerprint(model):
        raise RuntimeError("the adapters were trained on other frozen base weights (another model revision or seed)")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)


def merged_copy(encoder: nn.Module) -> nn.Module:
    """A copy of ``encoder`` whose adapters are merged into the base weights and removed: a plain pipeline, as
    peft's ``merge_and_unload`` leaves a model (the trained encoder keeps its adapters)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(encoder)
    model = merged.transformers_model
    for module_name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    vars(model).pop("peft_config", None)  # set by peft on the instance: its save would write adapters only
    for parameter in merged.parameters():
        parameter.requires_grad_(True)
    return merged


def card_row(config: dict, encoder: nn.Module) -> list[str]:
    """The model card's line on LoRA (none for a run without it): merged, or the adapters alone and their base, as
    ``encoder`` is saved."""
    if not config.get("lora_r"):
        return []
    targets = ", ".join(config.get("lora_target_modules") or []) or "peft's default for the model type"
    adapters = (f"r {config['lora_r']}, alpha {config.get('lora_alpha')}, dropout {config.get('lora_dropout')}, "
                f"on {targets}")  # fmt: skip
    base = saved_adapter_base(encoder)
    if base is None:
        return [f"| weights | the base weights with LoRA adapters merged in ({adapters}) |"]
    return [f"| weights | LoRA adapters only ({adapters}; `lora_export: adapter`): `SentenceTransformer(path)` "
            f"loads the base `{base}` and applies them (needs peft) |"]  # fmt: skip
