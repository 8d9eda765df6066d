"""Contrastive losses behind one switch: ``--loss NAME``.

Each loss lives in its own module with its formula and paper in the docstring and follows the call contract
of :mod:`simcse_flat.losses.base`. Stateful losses (EMC², SogCLR) also take the data-set size and keep their
per-sample state as buffers, so it is saved and restored with the checkpoint.
"""

from __future__ import annotations

import difflib

from .base import ContrastiveLoss
from .dcl import DCLLoss
from .emc2 import EMC2Loss
from .flatnce import FlatNCELoss
from .infonce import InfoNCELoss
from .sogclr import SogCLRLoss

LOSSES: dict[str, type[ContrastiveLoss]] = {
    InfoNCELoss.name: InfoNCELoss,
    FlatNCELoss.name: FlatNCELoss,
    DCLLoss.name: DCLLoss,
    SogCLRLoss.name: SogCLRLoss,
    EMC2Loss.name: EMC2Loss,
}


def loss_class(name: str) -> type[ContrastiveLoss]:
    """The loss class registered under ``name``, or a ``ValueError`` naming the closest valid one."""
    try:
        return LOSSES[name]
    except KeyError:
        close = difflib.get_close_matches(name, LOSSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}.{hint}") from None


def build_loss(name: str, *, dataset_size: int | None = None, seed: int | None = None, **kwargs) -> ContrastiveLoss:
    """Instantiate a loss by name. ``dataset_size`` is passed only to losses that keep per-sample state, ``seed``
    only to those that draw random numbers of their own (unset: the class's default)."""
    cls = loss_class(name)
    if cls.needs_dataset_size:
        if dataset_size is None:
            raise ValueError(f"loss {name!r} keeps per-sample state and needs the data-set size")
        kwargs["dataset_size"] = dataset_size
    if cls.seeded and seed is not None:
        kwargs["seed"] = seed
    return cls(**kwargs)


def build_loss_from_settings(settings, **context) -> ContrastiveLoss:
    """The loss a run's loss settings name (``settings``: :class:`~simcse_flat.config.LossArguments`), with the
    settings its class reads (its ``settings``: init argument -> setting; unset ones keep the class's default).

    ``context`` is what the loop knows (``dataset_size``, ``rank``, ``world_size``, ``seed``), handed to
    :func:`build_loss`, which gives each loss only what it takes.
    """
    cls = loss_class(settings.loss)
    kwargs = {"temperature": settings.temperature, "hard_negative_weight": settings.hard_negative_weight}
    for argument, setting in cls.settings.items():
        if getattr(settings, setting) is not None:
            kwargs[argument] = getattr(settings, setting)
    return build_loss(settings.loss, **kwargs, **context)


__all__ = [
    "LOSSES",
    "ContrastiveLoss",
    "DCLLoss",
    "EMC2Loss",
    "FlatNCELoss",
    "InfoNCELoss",
    "SogCLRLoss",
    "build_loss",
    "build_loss_from_settings",
    "loss_class",
]
