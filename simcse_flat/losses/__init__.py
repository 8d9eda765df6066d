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


def build_loss(name: str, *, dataset_size: int | None = None, **kwargs) -> ContrastiveLoss:
    """Instantiate a loss by name. ``dataset_size`` is passed only to losses that keep per-sample state."""
    cls = loss_class(name)
    if getattr(cls, "needs_dataset_size", False):
        if dataset_size is None:
            raise ValueError(f"loss {name!r} keeps per-sample state and needs the data-set size")
        kwargs["dataset_size"] = dataset_size
    return cls(**kwargs)


__all__ = [
    "LOSSES",
    "ContrastiveLoss",
    "DCLLoss",
    "EMC2Loss",
    "FlatNCELoss",
    "InfoNCELoss",
    "SogCLRLoss",
    "build_loss",
    "loss_class",
]
