"""The run the loop trains, built before its first step: config -> modality -> parts -> prepared, resumed, claimed.

:func:`build_run` refuses what FSDP cannot do (:func:`simcse_flat.sharding.check_sharding`), checks and locks the
output folder (before minutes of loading), asks the run's modality for its parts
(:meth:`simcse_flat.modalities.Modality.build`), builds the loader, the loss and the optimizer around them and prepares
them with accelerate (under FSDP sharded, after :class:`~simcse_flat.sharding.ShardedModel` kept the model's
structure), restores the checkpoint it resumes from, and makes the folder the run's own (its ``config.yaml``, the
trackers). The loop itself is :mod:`simcse_flat.trainer`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import get_scheduler

from .checkpoint import Trainables, TrainState, changed_settings, find_checkpoint, load_checkpoint
from .config import RunConfig
from .data.batching import SourceBatchSampler
from .distributed import on_main
from .errors import DataError
from .grad_cache import GradCache
from .losses import build_loss_from_settings
from .optim import build_optimizer
from .run_folder import (
    RUN_FILES,
    RunLock,
    check_earlier_run,
    preflight_output_dir,
    start_run_folder,
    write_text_atomically,
)
from .sharding import ShardedModel, check_sharding, is_sharded
from .step_metrics import Finiteness

if TYPE_CHECKING:
    from tqdm.auto import tqdm

    from .config import TrainerArguments
    from .losses.base import ContrastiveLoss
    from .modalities import TrainingParts
    from .samples import SampleRequest
    from .step_metrics import Window


@dataclass
class Run:
    """A run between its first and last step: what :func:`build_run` made and the loop reads or advances."""

    config: RunConfig
    accelerator: Accelerator
    parts: TrainingParts
    model: torch.nn.Module  # the modality's model, prepared by accelerate (DDP-wrapped, or FSDP-sharded)
    loss_fn: ContrastiveLoss
    optimizer: torch.optim.Optimizer
    scheduler: object  # stepped by hand once per optimizer step (a prepared scheduler steps once per *process*)
    loader: DataLoader
    batches: SourceBatchSampler  # the loader's batch sampler, whose epoch the loop sets
    trainables: Trainables  # what a checkpoint saves and a resume restores
    total_steps: int
    state: TrainState = field(default_factory=TrainState)
    config_yaml: str = ""  # the resolved configuration, as saved beside every checkpoint
    evaluator: Callable[[torch.nn.Module], dict] | None = None  # None: no evaluation
    cache: GradCache | None = None  # GradCache, when grad_cache_chunk_size asks for it
    encode: Callable[[dict], Tensor] | None = None  # the forward of a collated batch (through the cache if any)
    encode_samples: Callable[[SampleRequest], Tensor] | None = None  # samples outside the batch, for a loss that asks
    finite: Finiteness | None = None
    window: Window | None = None
    progress: tqdm | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    last_eval: dict | None = None  # the latest evaluation's results (final/'s card)

    @property
    def evaluating(self) -> bool:
        """Whether the run evaluates (at step 0, every ``eval_steps`` and at the end)."""
        return self.evaluator is not None and self.config.training.eval_steps > 0

    @property
    def args(self) -> TrainerArguments:
        return self.config.training

    @property
    def output_dir(self) -> Path:
        return Path(self.config.training.output_dir)

    @property
    def sharded(self) -> ShardedModel | None:
        """Under FSDP, the way to the full weights (evaluation, export, checkpoints); the checkpoint's own."""
        return self.trainables.sharded


def build_run(config: RunConfig, evaluator: Callable[[torch.nn.Module], dict] | None, lock: RunLock) -> Run:
    """Everything before the first step: the folder checked and locked, the modality's parts, the loss and the
    optimizer prepared by accelerate, the checkpoint resumed from, the run's folder started."""
    args = config.training
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=f"{args.output_dir}/logs"),
    )
    check_sharding(config, accelerator)  # what FSDP cannot do fails here, before anything loads
    set_seed(args.seed)
    # the folder's problems before minutes of loading; the lock keeps a second job out until this one ends
    on_main(accelerator, _claim_output_dir, config, lock)
    parts = config.modality.build(config, evaluate=evaluator is None)  # the caller's evaluator, else the modality's
    run = _prepare(config, accelerator, parts)
    run.evaluator = evaluator if evaluator is not None else parts.evaluator
    if args.resume_from_checkpoint:
        run.state = _resume(run)
    run.config_yaml = _config_yaml(config)
    _start_run_folder(run)
    if args.grad_cache_chunk_size:  # the whole batch's negatives, one chunk's activations
        run.cache = GradCache(run.model, args.grad_cache_chunk_size, functools.partial(accelerator.no_sync, run.model))
    run.encode = run.cache.encode if run.cache is not None else functools.partial(_forward, run.model)
    run.encode_samples = parts.sample_encoder(run.encode, accelerator.device)
    run.finite = Finiteness(accelerator.device)
    return run


def _prepare(config: RunConfig, accelerator: Accelerator, parts: TrainingParts) -> Run:
    """The loader over the modality's data set, the loss, the optimizer and its schedule, prepared by accelerate."""
    args = config.training
    world_batch = args.per_device_train_batch_size * accelerator.num_processes
    sizes = parts.source_sizes or [len(parts.dataset)]
    for name, size in zip(config.data.train_file if parts.source_sizes else ["the data"], sizes):
        if size < world_batch:
            raise DataError(f"{name}: {size} examples, fewer than one batch of {world_batch}")
    batches = SourceBatchSampler(sizes, args.per_device_train_batch_size, accelerator.num_processes, args.seed,
                                 config.data.dataset_sampling, config.data.train_file_weights)  # fmt: skip
    loader = DataLoader(
        parts.dataset,
        batch_sampler=batches,
        collate_fn=parts.collate_fn,
        num_workers=args.dataloader_num_workers,
        # its own generator: starting an epoch (or a resumed one) must not draw from the RNG that drives dropout
        generator=torch.Generator().manual_seed(args.seed),
    )
    # the loss learns its process from us, as open_clip's ClipLoss: its offsets into gathered rows depend on it
    loss_fn = build_loss_from_settings(config.loss, dataset_size=len(parts.dataset), rank=accelerator.process_index,
                                       world_size=accelerator.num_processes, seed=args.seed)  # fmt: skip
    step_batch = world_batch * args.gradient_accumulation_steps  # what lr_scaling scales by
    optimizer = build_optimizer(_param_groups(parts.model, args.weight_decay), args, accelerator.device, step_batch)
    sharded = ShardedModel(accelerator, parts.model) if is_sharded(accelerator) else None  # FSDP: before prepare
    model, optimizer, loader = accelerator.prepare(parts.model, optimizer, loader)
    loss_fn.to(accelerator.device)
    on_main(accelerator, preflight_output_dir, Path(args.output_dir), _checkpoint_bytes(model, loss_fn))
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_training_steps=total_steps,
                              num_warmup_steps=args.warmup_steps or int(args.warmup_ratio * total_steps))  # fmt: skip
    trainables = Trainables(accelerator.unwrap_model(model), optimizer, scheduler, loss_fn, accelerator.scaler,
                            sharded)  # fmt: skip
    return Run(config, accelerator, parts, model, loss_fn, optimizer, scheduler, loader, batches, trainables,
               total_steps)  # fmt: skip


def _resume(run: Run) -> TrainState:
    """The state of the checkpoint ``resume_from_checkpoint`` names, restored (a fresh state if there is none)."""
    args, accelerator = run.args, run.accelerator
    # checked on the main process (checksums of every file), the choice shared with the others
    path, skipped = on_main(accelerator, find_checkpoint, args.resume_from_checkpoint, run.output_dir,
                            accelerator.num_processes, args.ignore_rng_state)  # fmt: skip
    for line in skipped:
        accelerator.print(f"warning: {line}")
    if path is None:
        return TrainState()
    state = load_checkpoint(accelerator, path, run.trainables, args.ignore_rng_state)
    accelerator.print(f"resumed from {path} at step {state.step}")
    if args.ignore_rng_state:
        accelerator.print("warning: --ignore_rng_state: the random draws differ from the interrupted run's")
    for change in changed_settings(path, run.config.to_dict()):
        accelerator.print(f"warning: resumed with a setting changed since that checkpoint: {change}")
    return state


def _start_run_folder(run: Run) -> None:
    """The folder becomes this run's (its config.yaml written), the trackers start, the run says what it trains."""
    args, accelerator = run.args, run.accelerator
    if accelerator.is_main_process:
        # what this run will write besides checkpoints and exports: logs/ only with a tracker
        start_run_folder(run.output_dir, run.state.step,
                         tuple(n for n in RUN_FILES if n != "logs" or args.report_to != "none"))  # fmt: skip
        write_text_atomically(run.output_dir / "config.yaml", run.config_yaml)
    accelerator.wait_for_everyone()  # no process logs into the folder before it is this run's
    if args.report_to != "none":
        accelerator.init_trackers(args.run_name or run.output_dir.name, config=_tracker_config(run.config))
    accelerator.print(
        f"{run.parts.description}; "
        f"{accelerator.num_processes} process(es) x batch {args.per_device_train_batch_size} "
        f"x accumulation {args.gradient_accumulation_steps}; {run.total_steps} optimizer steps, loss {run.loss_fn.name}"
    )


def _forward(model: torch.nn.Module, inputs: dict) -> Tensor:
    return model(**inputs)


# ---- helpers ---------------------------------------------------------------------------------------------------


def _claim_output_dir(config: RunConfig, lock: RunLock) -> None:
    args = config.training
    weights = config.modality.expected_weights_bytes(config)  # with two Adam moments; checked exactly once built
    preflight_output_dir(args.output_dir, 3 * weights if weights else None)
    lock.acquire()
    check_earlier_run(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)


def _checkpoint_bytes(model: torch.nn.Module, loss_fn: torch.nn.Module) -> int:
    """Weights (with LoRA, the adapters only), two optimizer moments, the loss state, and room to spare (a quarter)."""
    from .models.adapters import trainable_tensors

    adapters = trainable_tensors(model)
    weights = sum(p.numel() * p.element_size() for p in (model.parameters() if adapters is None else adapters.values()))
    state = sum(b.numel() * b.element_size() for b in loss_fn.buffers())
    return int(1.25 * (3 * weights + state))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (the usual BERT recipe; SimCLR's too)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _config_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def _tracker_config(config: RunConfig) -> dict:
    # trackers (tensorboard hparams) take scalars and strings only
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.to_dict().items()}
