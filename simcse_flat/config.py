"""Run configuration: typed dataclasses, filled from a yaml file and then the command line.

``train.py --config configs/x.yaml --learning_rate 1e-5`` reads the yaml, then lets every flag override it.
Parsing is ``transformers.HfArgumentParser``; what it lacks we add: one yaml for all the dataclasses, and
unknown keys rejected with the closest valid name. Where ``transformers.TrainingArguments`` has a name for a
setting we use it (earlier names of ours stay accepted: :data:`KEY_ALIASES`), so SimCSE and HF users feel at home.
Our training dataclass is :class:`TrainerArguments`, so it never shadows transformers' own class.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from .config_checks import check_choice, validate
from .errors import ConfigError  # the core's errors (simcse_flat.errors), importable from here too
from .modalities import MODALITIES, Modality, modality_named


@dataclass
class ModalityArguments:
    _argument_group_name = "modality"  # HfArgumentParser: one --help section per dataclass
    modality: str = field(
        default="text",
        metadata={"help": "text (sentence encoders) | vision (SimCLR-style): the run reads that modality's group "
                  "below and ignores the other's."},
    )


@dataclass
class DataArguments:
    _argument_group_name = "data"
    train_file: list[str] = field(
        default_factory=lambda: ["data/quickstart_sentences.txt"],
        metadata={"help": ".txt (one sentence a line: unsupervised), .csv with sent0,sent1[,hard_neg] (supervised), "
                  "or a hub dataset id; several (a yaml list, or several after the flag): each batch from one."},
    )
    dataset_sampling: str = field(
        default="proportional",
        metadata={"help": "With several train_file: proportional (every batch of every source once an epoch, "
                  "shuffled; train_file_weights scale a source) | round_robin (sources in turn, until one runs out)."},
    )
    train_file_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per train_file (proportional): 2 = its batches twice an epoch."}
    )
    dedupe: bool = field(
        default=False, metadata={"help": "Drop rows that repeat an earlier row's text (the premise, for triples)."}
    )
    data_cache_dir: str | None = field(
        default=None, metadata={"help": "Where the Arrow copies of training files go; unset: the datasets cache."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split of a hub dataset."})
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Use only N examples (of each train_file): the first N rows, or N images drawn at random."},
    )
    data_license: str | None = field(default=None, metadata={"help": "Licence of the training data, for the model card."})


@dataclass
class LossArguments:
    _argument_group_name = "loss"
    loss: str = field(default="infonce", metadata={"help": "infonce | flatnce | dcl | sogclr | emc2"})
    temperature: float = field(default=0.05, metadata={"help": "τ in cos / τ."})
    hard_negative_weight: float = field(default=0.0, metadata={"help": "Added to the hard negative's logit (SimCSE)."})
    sogclr_gamma: float = field(default=0.9, metadata={"help": "SogCLR: moving-average rate of u."})
    dcl_weight_sigma: float | None = field(default=None, metadata={"help": "DCL: σ of the DCLW weighting (off if unset)."})
    emc2_proposals: int | None = field(
        default=None,
        metadata={"help": "EMC², kernel paper: uniform MH proposals per anchor and step (unset: 1, the paper's step; "
                  "K > 1 averages the gradient over the last K - K//2 states)."},
    )
    emc2_kernel: str = field(
        default="official_scan",
        metadata={"help": "EMC²: official_scan (the official code: every in-batch column in turn, gradient averaged "
                  "over the second half; the closest to the global softmax at 300 and 3,000 epochs measured) | "
                  "paper (one uniform proposal a step: the global softmax exactly invariant, slow to mix). "
                  "docs/benchmarks.md, EMC²'s kernels."},
    )
    negatives: str | None = field(
        default=None,
        metadata={"help": "cross_view (SimCSE, CLIP: each anchor against the other view of every sample, B-1 "
                  "negatives) | all_views (SimCLR's NT-Xent: every view against both views of every other sample, "
                  "2B-2 negatives). Unset: all_views for vision, cross_view for text."},
    )
    mask_duplicates: bool = field(
        default=True,
        metadata={"help": "Leave out of the negatives any candidate with the anchor's content key (the same text, "
                  "or the same image): a repeated sentence is never its own negative, in the batch or in EMC²'s "
                  "chains. false: keep them (to measure what masking changes)."},
    )
    emc2_refresh_negatives: bool = field(
        default=True,
        metadata={"help": "EMC²: re-encode each chain's negative every step (exact gradient, one more forward of B "
                  "rows); off: anchors whose negative is not in the batch are skipped (cheaper, biased)."},
    )
    emc2_estimator: str = field(
        default="refresh",
        metadata={"help": "EMC², with emc2_refresh_negatives: refresh (every chain's negative re-encoded before the "
                  "step, its fresh score in the MH test) | stored (the official code: the MH test reads the stored "
                  "score; only out-of-batch states held past the burn-in are encoded, after the step). "
                  "docs/benchmarks.md, the global loss measured exactly."},
    )


@dataclass
class TrainerArguments:
    _argument_group_name = "training (names as transformers.TrainingArguments)"
    output_dir: str = field(default="runs/quickstart", metadata={"help": "Checkpoints, logs and the final model."})
    per_device_train_batch_size: int = field(
        default=64, metadata={"help": "Examples (sentences, images; not views) per process."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step: a larger gradient batch, not more negatives."}
    )
    grad_cache_chunk_size: int = field(
        default=0,
        metadata={"help": "GradCache: encode the batch this many rows (every view counts) at a time and keep one "
                  "chunk's activations: the whole batch's negatives in a chunk's memory, for one more forward "
                  "pass. 0: off."},
    )
    gradient_checkpointing: bool = field(
        default=False,
        metadata={"help": "Recompute each transformer layer in the backward pass (non-reentrant) instead of keeping "
                  "its activations: less memory for one more forward pass; the same gradient."},
    )
    learning_rate: float = field(default=3e-5, metadata={"help": "Peak learning rate, before lr_scaling."})
    lr_scaling: str = field(
        default="none", metadata={"help": "none | linear (lr·B/256) | sqrt (lr·√B), B examples a step (FlatCLR)."}
    )
    optim: str = field(default="adamw", metadata={"help": "adamw (fused) | sgd (momentum 0.9) | lars (SimCLR)."})
    weight_decay: float = 0.0
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping; 0 turns it off."})
    num_train_epochs: float = 1.0
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides num_train_epochs if > 0."})
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Any transformers scheduler name."})
    seed: int = 42
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no | bf16 | fp16; unset: what `accelerate launch`/config says (CPU: no)."}
    )
    logging_steps: int = 10
    save_steps: int = field(default=500, metadata={"help": "Checkpoint every N optimizer steps; 0: only at the end."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep the last K checkpoints."})
    save_strategy: str = field(
        default="steps",
        metadata={"help": "steps: a checkpoint every save_steps | no: none during training (save_steps 0; the last "
                  "step is still saved, so the run can be resumed and exported)."},
    )
    eval_steps: int = field(default=0, metadata={"help": "Evaluate every N steps; 0: never during training."})
    eval_strategy: str | None = field(
        default=None,
        metadata={"help": "no | steps (transformers' names). Unset: steps when eval_steps > 0. steps without "
                  "eval_steps evaluates every logging_steps, as transformers does."},
    )
    eval_tasks: list[str] = field(default_factory=lambda: ["stsb"], metadata={"help": "STS tasks for eval_steps."})
    eval_split: str = "dev"
    eval_data_dir: str | None = field(default=None, metadata={"help": "SentEval-layout folder; unset: hub datasets."})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "latest | PATH of a checkpoint folder (also --resume_from).", "aliases": ["--resume_from"]}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Start over in an output_dir holding an earlier run (deletes its outputs)."}
    )
    ignore_rng_state: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint whose RNG state is missing or damaged, with fresh random draws "
                  "(the run then differs from an uninterrupted one)."},
    )
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard | wandb | all | none"})
    dataloader_num_workers: int = 0
    run_name: str | None = None


# the --help groups, in this order: the choice of modality, each modality's own settings, then the shared ones
ALL_ARGUMENTS = (ModalityArguments, *(m.settings for m in MODALITIES.values()), DataArguments, LossArguments,
                 TrainerArguments)  # fmt: skip
# earlier names of ours -> the transformers.TrainingArguments name now used
KEY_ALIASES = {"resume_from": "resume_from_checkpoint"}


@dataclass
class RunConfig:
    """A run's settings: the chosen modality, its own settings (its dataclass: text's or vision's, not both), and
    the settings every modality shares."""

    modality: Modality  # from simcse_flat.modalities: what builds the model, data, evaluator and export
    settings: Any  # the modality's settings, an instance of modality.settings
    data: DataArguments
    loss: LossArguments
    training: TrainerArguments

    def to_dict(self) -> dict[str, Any]:
        """Flat ``{key: value}``, the same shape as the yaml, so it can be saved and re-read."""
        parts = (self.settings, self.data, self.loss, self.training)
        return {"modality": self.modality.name, **{k: v for part in parts for k, v in dataclasses.asdict(part).items()}}


def _valid_keys() -> list[str]:
    return [f.name for cls in ALL_ARGUMENTS for f in dataclasses.fields(cls)]


def _unknown_key_error(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, _valid_keys(), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid yaml: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value, got {type(values).__name__}")
    values = {KEY_ALIASES.get(key, key): value for key, value in values.items()}
    for key in values:
        if key not in _valid_keys():
            line = _line_of_key(path, key)
            raise _unknown_key_error(key, f"{path}:{line}" if line else str(path))
    return values


def _line_of_key(path: Path, key: str) -> int | None:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.split(":", 1)[0].strip() == key:
            return number
    return None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each flag once: ``--learning_rate FLOAT``, not also ``--learning-rate LEARNING_RATE`` (the
    dash spelling HfArgumentParser adds is still accepted), nor ``--no_X`` beside ``--X [true|false]``."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def add_argument(self, action: argparse.Action) -> None:
        if not all(o.startswith(("--no_", "--no-")) for o in action.option_strings):  # --no_X: --X false, listed
            super().add_argument(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return ", ".join(o for o in action.option_strings if "-" not in o[2:] or o.replace("-", "_")[2:] not in
                             {s[2:] for s in action.option_strings})  # fmt: skip
        flag = next((o for o in action.option_strings if "-" not in o[2:]), action.option_strings[0])
        if action.nargs == "?" and action.const is True:
            value = "[true|false]"
        elif action.choices:
            value = "{" + "|".join(map(str, action.choices)) + "}"
        else:
            value = getattr(action.type, "__name__", "value").upper()
            value = value if value in ("INT", "FLOAT") else "VALUE"
            value = f"{value} [{value} ...]" if action.nargs in ("+", "*") else value
        return f"{flag} {value}"


def parse_config(argv: list[str] | None = None) -> RunConfig:
    """``--config FILE`` (optional) then ``--key value`` flags, into a :class:`RunConfig`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    parser = HfArgumentParser(
        ALL_ARGUMENTS,
        allow_abbrev=False,
        usage="train.py [--config FILE.yaml] [--key value ...]",
        description="Every key of the yaml given with --config can be overridden by the flag of the same name "
        "(written with _ or -).",
        formatter_class=_HelpFormatter,
    )
    if known.config:
        parser.set_defaults(**load_yaml(known.config))
    *parsed, remaining = parser.parse_args_into_dataclasses(args=rest, return_remaining_strings=True)
    if remaining:
        flag = next((r for r in remaining if r.startswith("--")), remaining[0])
        raise _unknown_key_error(flag.lstrip("-").split("=", 1)[0], "command line")
    config = _run_config({type(part): part for part in parsed})
    validate(config)
    return config


def _run_config(parsed: dict[type, Any]) -> RunConfig:
    """The chosen modality's settings and the shared ones; another modality's settings are left out (one away from
    its default refused: :meth:`~simcse_flat.modalities.Modality.check_unused`)."""
    modality = modality_named(parsed[ModalityArguments].modality)
    for other in MODALITIES.values():
        if other is not modality:
            other.check_unused(parsed[other.settings], modality)
    return RunConfig(modality, parsed[modality.settings], parsed[DataArguments], parsed[LossArguments],
                     parsed[TrainerArguments])  # fmt: skip


__all__ = ["ConfigError", "RunConfig", "check_choice", "parse_config", "validate"]
