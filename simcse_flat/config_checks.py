"""Checks on a run's settings that need no file and no model, so a bad value fails before anything loads.

:func:`validate` runs at the end of :func:`simcse_flat.config.parse_config`: the shared settings' choices and ranges
(NaN and infinity included) and transformers' strategy names, then the chosen modality's own checks
(:meth:`simcse_flat.modalities.Modality.check`: where the text model comes from, vision's images). Every error names
the setting. :func:`check_range` and :func:`check_choice` serve the modalities' checks too; this module imports no
other of the package but its errors.
"""

from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import LossArguments, RunConfig, TrainerArguments


def validate(config: RunConfig) -> None:
    """Checks that need no file or model: fail before anything is loaded."""
    from .data.batching import SAMPLINGS
    from .losses import loss_class
    from .optim import LR_SCALINGS, OPTIMIZERS

    training, data = config.training, config.data
    if isinstance(data.train_file, str):  # a yaml may give one file as a plain string
        data.train_file = [data.train_file]
    check_choice("dataset_sampling", data.dataset_sampling, SAMPLINGS)
    if data.train_file_weights is not None:
        if len(data.train_file_weights) != len(data.train_file) or data.dataset_sampling != "proportional":
            raise ConfigError(
                f"train_file_weights needs one weight per train_file ({len(data.train_file)}) and "
                f"dataset_sampling: proportional; got {len(data.train_file_weights)} with {data.dataset_sampling}"
            )
        for weight in data.train_file_weights:
            check_range("train_file_weights", weight, low=0.0)
    try:
        loss_class(config.loss.loss)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    _validate_numbers(config)
    if training.per_device_train_batch_size < 2:
        raise ConfigError(
            f"per_device_train_batch_size must be >= 2 (got {training.per_device_train_batch_size}): "
            "a contrastive loss needs at least one in-batch negative"
        )
    if training.mixed_precision not in (None, "no", "bf16", "fp16"):
        raise ConfigError(f"mixed_precision must be no, bf16 or fp16, got {training.mixed_precision!r}")
    if training.report_to not in ("tensorboard", "wandb", "all", "none"):
        raise ConfigError(f"report_to must be tensorboard, wandb, all or none, got {training.report_to!r}")
    if training.gradient_accumulation_steps < 1:
        raise ConfigError("gradient_accumulation_steps must be >= 1")
    if training.grad_cache_chunk_size < 0:
        raise ConfigError(f"grad_cache_chunk_size must be >= 0 (0: off), got {training.grad_cache_chunk_size}")
    if config.loss.emc2_proposals is not None and config.loss.emc2_proposals < 1:
        raise ConfigError(f"emc2_proposals must be >= 1, got {config.loss.emc2_proposals}")
    check_choice("optim", training.optim, OPTIMIZERS)
    _resolve_strategies(training)
    check_choice("lr_scaling", training.lr_scaling, tuple(LR_SCALINGS))
    _validate_loss_choices(config.loss)
    config.modality.check(config)  # the modality's own settings: text's model, vision's images


def _resolve_strategies(training: TrainerArguments) -> None:
    """transformers' ``eval_strategy`` / ``save_strategy`` in terms of the step counts the loop reads."""
    if training.eval_strategy is not None:
        check_choice("eval_strategy", training.eval_strategy, ("no", "steps"))
    check_choice("save_strategy", training.save_strategy, ("no", "steps"))
    if training.eval_strategy == "no":
        training.eval_steps = 0
    elif training.eval_strategy == "steps" and training.eval_steps == 0:
        training.eval_steps = training.logging_steps
    if training.save_strategy == "no":
        training.save_steps = 0


def _validate_numbers(config: RunConfig) -> None:
    """Every number in range (NaN and infinity refused), so that a typo fails here, not after the model loads or
    as a NaN loss an hour in."""
    training, loss = config.training, config.loss
    check_range("learning_rate", training.learning_rate, low=0.0)
    check_range("temperature", loss.temperature, low=0.0)
    check_range("num_train_epochs", training.num_train_epochs, low=0.0)
    check_range("weight_decay", training.weight_decay, low=0.0, inclusive=True)
    check_range("max_grad_norm", training.max_grad_norm, low=0.0, inclusive=True, note="0 turns clipping off")
    check_range("warmup_ratio", training.warmup_ratio, low=0.0, high=1.0, inclusive=True)
    check_range("hard_negative_weight", loss.hard_negative_weight)
    check_range("sogclr_gamma", loss.sogclr_gamma, low=0.0, high=1.0)
    if loss.dcl_weight_sigma is not None:
        check_range("dcl_weight_sigma", loss.dcl_weight_sigma, low=0.0)
    at_least = {
        "logging_steps": (training.logging_steps, 1),
        "warmup_steps": (training.warmup_steps, 0),
        "save_steps": (training.save_steps, 0),
        "save_total_limit": (training.save_total_limit, 0),
        "eval_steps": (training.eval_steps, 0),
        "dataloader_num_workers": (training.dataloader_num_workers, 0),
        "seed": (training.seed, 0),
    }
    if config.data.max_train_samples is not None:
        at_least["max_train_samples"] = (config.data.max_train_samples, 2)
    for key, (value, low) in at_least.items():
        if value < low:
            raise ConfigError(f"{key} must be >= {low}, got {value}")
    if training.max_steps == 0 or training.max_steps < -1:
        raise ConfigError(f"max_steps must be >= 1 (or -1: use num_train_epochs), got {training.max_steps}")
    from .optim import LR_SCHEDULERS

    check_choice("lr_scheduler_type", training.lr_scheduler_type, LR_SCHEDULERS)


def check_range(key: str, value: float, low: float | None = None, high: float | None = None,
                 inclusive: bool = False, note: str = "") -> None:  # fmt: skip
    """``low < value <= high`` (``low <= value`` if ``inclusive``), finite."""
    bad = not math.isfinite(value)
    bad |= low is not None and (value < low if inclusive else value <= low)
    bad |= high is not None and value > high
    if bad:
        lower = "" if low is None else f"{'>=' if inclusive else '>'} {low:g}"
        upper = "" if high is None else f"<= {high:g}"
        wanted = " and ".join(part for part in (lower, upper) if part) or "a finite number"
        raise ConfigError(f"{key} must be {wanted}{f' ({note})' if note else ''}, got {value}")


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}{hint}")


def _validate_loss_choices(loss: LossArguments) -> None:
    """The loss's named choices (candidate set, EMC²'s kernel), from the modules that define them."""
    from .losses.emc2 import KERNELS
    from .views import NEGATIVES

    if loss.negatives is not None:
        check_choice("negatives", loss.negatives, NEGATIVES)
    check_choice("emc2_kernel", loss.emc2_kernel, KERNELS)
    if loss.emc2_proposals is not None and loss.emc2_kernel != "paper":
        raise ConfigError("emc2_proposals sets the paper kernel's proposals; add emc2_kernel: paper")
    check_choice("emc2_estimator", loss.emc2_estimator, ("refresh", "stored"))
    if loss.emc2_estimator != "refresh" and not loss.emc2_refresh_negatives:
        raise ConfigError(
            f"emc2_estimator {loss.emc2_estimator} encodes chain negatives: it needs emc2_refresh_negatives true"
        )
