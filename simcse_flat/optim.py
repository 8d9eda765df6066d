"""Optimisers the papers use, behind ``--optim``: fused AdamW (SimCSE), SGD with momentum, LARS (SimCLR, FlatCLR).

``--lr_scaling`` turns the configured ``learning_rate`` into a batch-dependent one, as FlatCLR's ``main.py`` does:

=========  ======================  ============================================================================
``none``   ``lr``                  SimCSE, and any recipe that states the learning rate itself
``linear`` ``lr · B / 256``        SimCLR (``lr = 0.3`` at 256 → 4.8 at 4096)
``sqrt``   ``lr · √B``             FlatCLR's choice for small batches (``lr = 0.075`` → 1.2 at 256)
=========  ======================  ============================================================================

``B`` is the batch one optimizer step averages over: per-device batch × processes × accumulation steps. This is the
only rule: ``scripts/compare_losses.py`` expresses its sweeps through it (:func:`configured_learning_rate`), and
the model card names it (:func:`describe_learning_rate`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import TrainerArguments

MOMENTUM = 0.9  # SimCLR, FlatCLR and MoCo all use 0.9 for SGD and LARS
OPTIMIZERS = ("adamw", "sgd", "lars")
LR_SCALINGS = {"none": "lr", "linear": "lr · B / 256", "sqrt": "lr · √B"}  # the table above
# transformers' SchedulerType values, which get_scheduler takes: named here, because importing transformers'
# trainer_utils (where the enum lives) imports peft and, through it, torchvision (tests/test_config.py compares them)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "reduce_lr_on_plateau", "cosine_with_min_lr", "cosine_warmup_with_min_lr",
                 "warmup_stable_decay", "greedy")  # fmt: skip


def scaled_learning_rate(base_lr: float, global_batch: int, scaling: str) -> float:
    """The learning rate ``lr_scaling`` asks for at batch ``global_batch`` (see the table above)."""
    if scaling == "none":
        return base_lr
    if scaling == "linear":
        return base_lr * global_batch / 256
    if scaling == "sqrt":
        return base_lr * math.sqrt(global_batch)
    raise ValueError(f"lr_scaling must be one of {', '.join(LR_SCALINGS)}, got {scaling!r}")


def configured_learning_rate(learning_rate: float, global_batch: int, scaling: str) -> float:
    """The ``learning_rate`` to configure so that ``scaling`` gives ``learning_rate`` at ``global_batch``: the
    inverse of :func:`scaled_learning_rate`."""
    return learning_rate / scaled_learning_rate(1.0, global_batch, scaling)


def describe_learning_rate(config: dict) -> str:
    """The learning rate as a model card gives it: the configured value and the rule that scaled it."""
    scaling = config.get("lr_scaling") or "none"
    rule = "" if scaling == "none" else f" with lr_scaling {scaling}: {LR_SCALINGS.get(scaling, '?')}, B examples a step"
    return f"{config.get('learning_rate')}{rule}"


def build_optimizer(
    groups: list[dict], args: TrainerArguments, device: torch.device, global_batch: int
) -> torch.optim.Optimizer:
    """The optimizer ``args.optim`` names, over parameter groups that carry their own ``weight_decay``."""
    lr = scaled_learning_rate(args.learning_rate, global_batch, args.lr_scaling)
    if args.optim == "adamw":
        # the fused kernel: ~8x faster than the per-tensor loop (a tenth of a MiniLM step on a CPU), and what
        # transformers' Trainer uses by default
        return torch.optim.AdamW(groups, lr=lr, fused=device.type in ("cuda", "cpu"))
    if args.optim == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM)
    if args.optim == "lars":
        return LARS(groups, lr=lr, momentum=MOMENTUM)
    raise ValueError(f"optim must be one of {', '.join(OPTIMIZERS)}, got {args.optim!r}")


class LARS(torch.optim.Optimizer):
    r"""Layer-wise Adaptive Rate Scaling (You, Gitman, Ginsburg, 2017; arXiv 1708.03888), as SimCLR uses it.

    For each weight matrix :math:`w` with gradient :math:`g`:

    .. math::

        d = g + \lambda w, \qquad
        q = \eta \, \frac{\lVert w \rVert}{\lVert d \rVert} \ (1 \text{ if either norm is } 0), \qquad
        m \leftarrow \mu m + q\, d, \qquad
        w \leftarrow w - \text{lr} \cdot m

    so every layer moves by about ``lr · η`` of its own norm, whatever the scale of its gradient: what lets SimCLR
    train at batch 4096 with one learning rate. Biases and normalisation parameters (every tensor with fewer than
    two dimensions) take neither weight decay nor the trust ratio (SimCLR's ``exclude_from_weight_decay`` and
    ``exclude_from_layer_adaptation``): for them LARS is plain SGD with momentum.

    Args:
        lr: learning rate (after any ``lr_scaling``).
        momentum: :math:`\mu`.
        weight_decay: :math:`\lambda`, per group (the trainer's groups already give biases and norms 0).
        trust_coefficient: :math:`\eta`; SimCLR uses 0.001.
    """

    def __init__(self, params, lr: float, momentum: float = MOMENTUM, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001) -> None:  # fmt: skip
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, {**defaults, "trust_coefficient": trust_coefficient})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = self._update(param, param.grad, group)
                buffer = self.state[param].get("momentum_buffer")
                if buffer is None:
                    buffer = self.state[param]["momentum_buffer"] = torch.zeros_like(param)
                buffer.mul_(group["momentum"]).add_(update)
                param.add_(buffer, alpha=-group["lr"])
        return loss

    @staticmethod
    def _update(param: Tensor, grad: Tensor, group: dict) -> Tensor:
        """``q · (g + λw)`` for weight matrices; the bare gradient for biases and norms."""
        if param.ndim < 2:
            return grad
        update = grad.add(param, alpha=group["weight_decay"])
        param_norm, update_norm = torch.linalg.vector_norm(param), torch.linalg.vector_norm(update)
        trust = torch.where(
            (param_norm > 0) & (update_norm > 0),
            group["trust_coefficient"] * param_norm / update_norm,
            torch.ones_like(param_norm),
        )
        return update.mul_(trust)
