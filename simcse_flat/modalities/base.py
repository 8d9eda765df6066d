"""The shape every modality has: settings, checks, parts, evaluation, export (:mod:`simcse_flat.modalities`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from ..config import RunConfig
    from ..export import RunSummary
    from .parts import TrainingParts


class Modality:
    """What differs between training on one kind of data and another; the loop, losses and checkpoints are shared."""

    name: str
    settings: type  # the dataclass of this modality's settings
    shardable: bool = False  # whether FSDP may shard its model (simcse_flat.sharding: the transformer layer the unit)

    def check(self, config: RunConfig) -> None:
        """The run's settings this modality reads, checked before anything loads (``ConfigError`` naming one)."""

    def check_unused(self, settings: object, chosen: Modality) -> None:
        """This modality's ``settings``, given to a run of the ``chosen`` one, where they do nothing: one set away
        from its default is refused (a run would silently ignore it); left at their defaults they pass, as an
        earlier ``config.yaml`` holding both modalities' settings does."""
        for option in dataclasses.fields(settings):
            value = getattr(settings, option.name)
            default = option.default_factory() if option.default is dataclasses.MISSING else option.default
            if value != default:
                raise ConfigError(f"{option.name}: {value!r} is a {self.name} setting, and this run's modality is "
                                  f"{chosen.name}: set modality: {self.name}, or leave {option.name} out")  # fmt: skip

    def build(self, config: RunConfig, evaluate: bool = True) -> TrainingParts:
        """The parts the loop trains; ``evaluate``: with the :meth:`evaluator` (when ``eval_steps`` asks for one)."""
        raise NotImplementedError

    def evaluator(self, config: RunConfig) -> Callable[[nn.Module], dict]:
        """What ``eval_steps`` runs: ``model -> results``, ``results["primary_metric"]`` naming the headline."""
        raise NotImplementedError

    def primary_metric(self, config: RunConfig) -> str:
        """The headline the evaluator reports as ``primary_metric`` (``log.jsonl`` keeps numbers only)."""
        raise NotImplementedError

    def export(self, model: nn.Module, folder: str | Path, overwrite: bool = False,
               summary: RunSummary | None = None) -> Path:  # fmt: skip
        """The trained (unwrapped) ``model`` as a folder, atomically; with ``summary``, its card and the run's files."""
        raise NotImplementedError

    def expected_weights_bytes(self, config: RunConfig) -> int | None:
        """A first guess at the weights' size on disk before the model loads; ``None``: unknown until built."""
        return None

    def final_scores(self, config: RunConfig, model: Path, probe: dict, test_tasks: list | None) -> dict:
        """What ``scripts/compare_losses.py`` adds for a trained ``final/`` folder."""
        return {}

    def untrained_scores(self, config: RunConfig, probe: dict) -> dict | None:
        """The untrained baseline's scores where the modality has one (``None``: its first evaluation is it)."""
        return None
