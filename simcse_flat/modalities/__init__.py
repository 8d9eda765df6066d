"""The modalities, one object each, and the one place that picks one by name.

A :class:`Modality` owns its settings dataclass (one ``--help`` group: :class:`~.text.TextArguments`,
:class:`~.vision.VisionArguments`) and its parts: ``check`` (its settings, before anything loads), ``build`` (model,
data set, collators, evaluator: :class:`~.parts.TrainingParts`), ``evaluator``, ``primary_metric``, ``export``, and
what ``scripts/compare_losses.py`` adds for a trained folder (``final_scores``, ``untrained_scores``). A run's
:class:`~simcse_flat.config.RunConfig` holds the chosen modality and its settings only; every other module asks the
modality, never its name. Importing this package imports neither sentence-transformers nor torchvision: each
modality imports its libraries when it checks or builds.
"""

from __future__ import annotations

import dataclasses

from ..config_checks import check_choice
from .base import Modality
from .parts import TrainingParts
from .text import TextArguments, TextModality
from .vision import VisionArguments, VisionModality

MODALITIES: dict[str, Modality] = {modality.name: modality for modality in (TextModality(), VisionModality())}


def modality_named(name: str) -> Modality:
    """The modality called ``name`` (``ConfigError`` naming the closest otherwise)."""
    check_choice("modality", name, tuple(MODALITIES))
    return MODALITIES[name]


def saved_settings(values: dict) -> tuple[Modality, object]:
    """The modality of a saved run's flat settings (its ``config.yaml``) and that modality's settings read from
    them; keys of another modality (a run written before a run kept only its own) are left out."""
    modality = modality_named(values.get("modality", "text"))
    names = {f.name for f in dataclasses.fields(modality.settings)}
    return modality, modality.settings(**{k: v for k, v in values.items() if k in names})


__all__ = ["MODALITIES", "Modality", "TextArguments", "TrainingParts", "VisionArguments", "modality_named",
           "saved_settings"]
