"""The training loop: accelerate, read top to bottom.

``train(config)`` builds everything from a :class:`~simcse_flat.config.RunConfig` and runs the loop:

    encoder + data + loss → accelerate.prepare → for each micro-batch: forward all views once, gather,
    loss (fp32), backward; every ``gradient_accumulation_steps``: clip, step, schedule, log, eval, checkpoint.

Mixed precision, gradient accumulation and multi-GPU / multi-node all come from ``accelerate`` (run with
``accelerate launch``). Note that accumulation enlarges the gradient's batch, not the negatives: each micro-batch
is contrasted only with itself, which is exactly where FlatNCE and EMC² help. ``grad_cache_chunk_size``
(:mod:`simcse_flat.grad_cache`) is the way to more negatives in the same memory.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .checkpoint import (
    Trainables,
    TrainState,
    changed_settings,
    checkpoint_path,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .config import RunConfig
from .data.batching import SourceBatchSampler
from .data.text import DataError
from .errors import USER_ERRORS, TrainingDiverged
from .export import RunSummary, hub_id_of, portable_config
from .grad_cache import GradCache
from .losses import build_loss_from_settings
from .modalities import build_parts, expected_weights_bytes
from .optim import build_optimizer
from .sharding import ShardedModel, check_sharding, is_sharded
from .run_folder import (
    LOG_FILE,
    RUN_FILES,
    RunLock,
    check_earlier_run,
    preflight_output_dir,
    start_run_folder,
    write_text_atomically,
)
from .views import contrastive_loss_on_views


@dataclass
class TrainResult:
    output_dir: Path
    final_model: Path
    state: TrainState
    history: list[dict[str, float]]  # one row per logged step: what the trackers got


def train(config: RunConfig, evaluator: Callable[[torch.nn.Module], dict] | None = None) -> TrainResult:
    """Train as ``config`` says (what ``train.py`` runs); returns where the final model is and the logged history.

    ``evaluator`` (``model -> results``, with ``primary_metric`` naming the headline) replaces the modality's own
    (STS for text, kNN accuracy for vision), which runs when ``eval_steps`` asks for one."""
    lock = RunLock(config.training.output_dir)  # held while the run lives, released (its file deleted) however it ends
    created = not Path(config.training.output_dir).exists()
    try:
        return _train(config, evaluator, lock)
    finally:
        lock.release()
        if created:  # a run that failed before writing anything leaves no empty folder either
            with contextlib.suppress(OSError):
                Path(config.training.output_dir).rmdir()  # only if empty


def _train(config: RunConfig, evaluator: Callable[[torch.nn.Module], dict] | None, lock: RunLock) -> TrainResult:
    args = config.training
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=f"{args.output_dir}/logs"),
    )
    check_sharding(config, accelerator)  # what FSDP cannot do fails here, before anything loads
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    # the folder's problems before minutes of loading; the lock keeps a second job out until this one ends
    on_main(accelerator, lambda: _claim_output_dir(config, lock))

    # ---- model, data, loss --------------------------------------------------------------------------------------
    parts = build_parts(config, evaluate=evaluator is None)  # the caller's evaluator, else the modality's
    encoder, dataset = parts.model, parts.dataset
    evaluator = evaluator if evaluator is not None else parts.evaluator
    world_batch = args.per_device_train_batch_size * accelerator.num_processes
    sizes = parts.source_sizes or [len(dataset)]
    for name, size in zip(config.data.train_file if parts.source_sizes else ["the data"], sizes):
        if size < world_batch:
            raise DataError(f"{name}: {size} examples, fewer than one batch of {world_batch}")
    batches = SourceBatchSampler(sizes, args.per_device_train_batch_size, accelerator.num_processes, args.seed,
                                 config.data.dataset_sampling, config.data.train_file_weights)  # fmt: skip
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=parts.collate_fn,
        num_workers=args.dataloader_num_workers,
        # its own generator: starting an epoch (or a resumed one) must not draw from the RNG that drives dropout
        generator=torch.Generator().manual_seed(args.seed),
    )
    # the loss learns its process from us, as open_clip's ClipLoss: its offsets into gathered rows depend on it
    loss_fn = build_loss_from_settings(config.loss, dataset_size=len(dataset), rank=accelerator.process_index,
                                       world_size=accelerator.num_processes, seed=args.seed)  # fmt: skip
    step_batch = world_batch * args.gradient_accumulation_steps  # what lr_scaling scales by
    optimizer = build_optimizer(_param_groups(encoder, args.weight_decay), args, accelerator.device, step_batch)

    sharded = ShardedModel(accelerator, encoder) if is_sharded(accelerator) else None  # FSDP: before prepare
    encoder, optimizer, loader = accelerator.prepare(encoder, optimizer, loader)
    loss_fn.to(accelerator.device)
    on_main(accelerator, lambda: preflight_output_dir(output_dir, _checkpoint_bytes(encoder, loss_fn)))
    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    # stepped by hand once per optimizer step (a prepared scheduler steps once per *process*)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.warmup_steps or int(args.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    trainables = Trainables(accelerator.unwrap_model(encoder), optimizer, scheduler, loss_fn, accelerator.scaler,
                            sharded)  # fmt: skip

    state = TrainState()
    if args.resume_from_checkpoint:
        # checked on the main process (checksums of every file), the choice shared with the others
        path, skipped = on_main(accelerator, lambda: find_checkpoint(
            args.resume_from_checkpoint, output_dir, accelerator.num_processes, args.ignore_rng_state))  # fmt: skip
        for line in skipped:
            accelerator.print(f"warning: {line}")
        if path is not None:
            state = load_checkpoint(accelerator, path, trainables, args.ignore_rng_state)
            accelerator.print(f"resumed from {path} at step {state.step}")
            if args.ignore_rng_state:
                accelerator.print("warning: --ignore_rng_state: the random draws differ from the interrupted run's")
            for change in changed_settings(path, config.to_dict()):
                accelerator.print(f"warning: resumed with a setting changed since that checkpoint: {change}")
    config_yaml = _config_yaml(config)
    if accelerator.is_main_process:
        # what this run will write besides checkpoints and exports: logs/ only with a tracker
        start_run_folder(output_dir, state.step, tuple(n for n in RUN_FILES if n != "logs" or args.report_to != "none"))
        write_text_atomically(output_dir / "config.yaml", config_yaml)
    accelerator.wait_for_everyone()  # no process logs into the folder before it is this run's
    if args.report_to != "none":
        accelerator.init_trackers(args.run_name or output_dir.name, config=_tracker_config(config))
    accelerator.print(
        f"{parts.description}; "
        f"{accelerator.num_processes} process(es) x batch {args.per_device_train_batch_size} "
        f"x accumulation {args.gradient_accumulation_steps}; {total_steps} optimizer steps, loss {loss_fn.name}"
    )

    # ---- the loop -----------------------------------------------------------------------------------------------
    history: list[dict[str, float]] = []
    running: dict[str, torch.Tensor] = {}  # the window's sums since the last logged row, on the device
    window_batches = 0  # micro-batches in those sums
    progress = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process, desc="train")
    cache = None
    if args.grad_cache_chunk_size:  # the whole batch's negatives, one chunk's activations
        cache = GradCache(encoder, args.grad_cache_chunk_size, lambda: accelerator.no_sync(encoder))
    encode = cache.encode if cache is not None else lambda inputs: encoder(**inputs)
    encode_samples = parts.sample_encoder(encode, accelerator.device)  # samples outside the batch, for a loss that asks
    evaluating = evaluator is not None and args.eval_steps > 0
    finite = _Finiteness(accelerator.device)

    def export_best(model, results: dict) -> None:  # best/: the weights and the card of its own evaluation
        parts.export(model, output_dir / "best", overwrite=True, summary=_run_summary(config, loss_fn, state.step, results))

    last_eval: dict | None = None
    if evaluating and state.step == 0:  # the starting point, for the before/after line; never "best"
        last_eval = _evaluate(accelerator, encoder, evaluator, None, state, output_dir, history, sharded)
    elif evaluating:  # resumed: the evaluation of the checkpoint's weights, for final/'s card if no step follows
        last_eval = _recorded_evaluation(output_dir, state.step)
    baseline = last_eval
    window_start, window_step = time.perf_counter(), state.step  # wall time per step since the last log
    encoder.train()
    while state.step < total_steps:
        epoch_loader = accelerator.skip_first_batches(loader, state.batch_in_epoch) if state.batch_in_epoch else loader
        # accelerate's loader hands its own epoch counter to the sampler on each pass; set it to ours
        epoch_loader.set_epoch(state.epoch)
        # and to the sampler itself: accelerate's set_epoch does not reach a sampler wrapped for sharding or
        # skipping, which left a resumed epoch on several processes on epoch 0's order
        batches.set_epoch(state.epoch)
        for batch in epoch_loader:
            with accelerator.accumulate(encoder):
                sample_ids = batch.pop("sample_ids")
                keys = batch.pop("sample_keys", None)  # content keys: an anchor's duplicates are not its negatives
                embeddings = encode(batch)
                loss, metrics = contrastive_loss_on_views(
                    loss_fn, embeddings, sample_ids, parts.symmetric, encode_samples, parts.negatives,
                    keys if config.loss.mask_duplicates else None,
                )
                finite.note("loss", loss.detach())  # on the device: read once a step, below
                accelerator.backward(loss)
                if cache is not None:  # the loss's gradient stopped at the cached embeddings; on into the encoder
                    cache.backward()
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    norm = accelerator.clip_grad_norm_(encoder.parameters(), args.max_grad_norm)
                    if accelerator.mixed_precision != "fp16":  # fp16's scaler skips such a step by design
                        finite.note("gradient norm", norm)
                if accelerator.sync_gradients:  # before the weights change: one reduce and one read a step
                    finite.stop_if_not(accelerator, state, output_dir)
                optimizer.step()  # accelerate makes these no-ops until the last micro-batch of the step
                optimizer.zero_grad()
            state.batch_in_epoch += 1
            _accumulate(running, {"loss": loss.detach(), **metrics})
            window_batches += 1
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped this step
                scheduler.step()
            state.step += 1
            progress.update(1)

            if state.step % args.logging_steps == 0 or state.step == total_steps:
                # the mean over every micro-batch of the window since the last row (transformers' Trainer
                # averages the window too); a step the epoch's end cut short counts its micro-batches only
                means = _reduce(accelerator, running, window_batches)
                row = {**means, "lr": scheduler.get_last_lr()[0], "epoch": state.epoch}
                now = time.perf_counter()
                row["seconds_per_step"] = (now - window_start) / (state.step - window_step)
                window_start, window_step = now, state.step
                _log(accelerator, output_dir, history, {"step": state.step, **row})
                progress.set_postfix(loss=f"{row['loss']:.4g}", infonce=f"{row['infonce']:.3g}")
                running.clear()
                window_batches = 0
            if evaluating and (state.step % args.eval_steps == 0 or state.step == total_steps):
                last_eval = _evaluate(accelerator, encoder, evaluator, export_best, state, output_dir, history,
                                      sharded)  # fmt: skip
            if args.save_steps > 0 and state.step % args.save_steps == 0:
                save_checkpoint(accelerator, output_dir, state, config_yaml, args.save_total_limit, trainables)
            if state.step >= total_steps:
                break
        else:  # the epoch ran out before total_steps
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.close()

    # ---- the end: last checkpoint, final model ------------------------------------------------------------------
    if checkpoint_path(output_dir, state.step) not in list_checkpoints(output_dir, only_ours=True):
        save_checkpoint(accelerator, output_dir, state, config_yaml, args.save_total_limit, trainables)
    final = output_dir / "final"
    trained = _plain_model(accelerator, encoder, sharded)  # under FSDP every process takes part in gathering it
    if accelerator.is_main_process:  # final/ is this run's own
        summary = _run_summary(config, loss_fn, state.step, last_eval)
        parts.export(trained, final, overwrite=True, summary=summary)
        if evaluating and state.best_step is not None:
            _print_before_after(accelerator, baseline, state)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(output_dir, final, state, history)


# ---- helpers, in the order the loop uses them -------------------------------------------------------------------


def on_main(accelerator: Accelerator, work: Callable[[], object]):
    """Run ``work`` on the main process and hand its result, or its error, to every process: a check that fails
    on the main process alone must stop all of them, not leave the others waiting for it at the next collective."""
    outcome: list = [None, None]
    error = None
    if accelerator.is_main_process:
        try:
            outcome[0] = work()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every process
            error = err
            outcome[1] = err if isinstance(err, USER_ERRORS) else RuntimeError(f"on the main process: {err!r}")
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome)
    if error is not None:
        raise error
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def _claim_output_dir(config: RunConfig, lock: RunLock) -> None:
    args = config.training
    weights = expected_weights_bytes(config)  # weights and two Adam moments; the exact check follows once built
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


class _Finiteness:
    """Whether a NaN or infinity appeared in this step's losses or gradient norm, kept on the device: each
    micro-batch adds to it without a host synchronisation, and :meth:`stop_if_not` reads it once a step, before the
    optimizer step, so the run stops, on every process at once, before it reaches the weights or a checkpoint."""

    WHAT = ("loss", "gradient norm")

    def __init__(self, device: torch.device) -> None:
        self.count = torch.zeros(len(self.WHAT), device=device)  # non-finite values this step, by kind
        self.first = torch.zeros(len(self.WHAT), device=device)  # the first of them, for the message

    def note(self, what: str, value: torch.Tensor) -> None:
        slot, value = self.WHAT.index(what), value.detach().float().reshape(())
        bad = torch.logical_not(torch.isfinite(value))
        self.first[slot] = torch.where(bad & (self.count[slot] == 0), value, self.first[slot])
        self.count[slot] += bad.float()

    def stop_if_not(self, accelerator: Accelerator, state: TrainState, output_dir: Path) -> None:
        everywhere = accelerator.reduce(self.count, reduction="sum") if accelerator.num_processes > 1 else self.count
        counts, local, first = everywhere.tolist(), self.count.tolist(), self.first.tolist()  # the step's one read
        self.count.zero_()
        self.first.zero_()
        if not any(counts):
            return
        slot = 0 if counts[0] else 1
        value = f"{first[slot]:g}" if local[slot] else "non-finite on another process"
        checkpoints = list_checkpoints(output_dir, only_ours=True)
        kept = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"the {self.WHAT[slot]} became {value} at step {state.step + 1}; stopped before updating the weights "
            f"({kept}). Lower learning_rate, raise temperature, or check the data."
        )


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


def _accumulate(running: dict[str, torch.Tensor], metrics: dict) -> None:
    """Add one micro-batch's metrics to the window's sums, on the device: no host synchronisation here."""
    for key, value in metrics.items():
        value = torch.as_tensor(value).detach().float()
        running[key] = running[key] + value if key in running else value


def _reduce(accelerator: Accelerator, running: dict[str, torch.Tensor], batches: int) -> dict[str, float]:
    """The window's mean of every metric over its ``batches`` micro-batches and over the processes (one
    all-reduce for all of them, and the one read on the host)."""
    keys = sorted(running)
    values = torch.stack([running[k].to(accelerator.device).reshape(()) for k in keys]) / max(batches, 1)
    values = accelerator.reduce(values, reduction="mean")
    return dict(zip(keys, values.tolist()))


def _log(accelerator: Accelerator, output_dir: Path, history: list, row: dict) -> None:
    """To the trackers, to the returned history, and to ``log.jsonl`` (plain text that survives a kill)."""
    step = row["step"]
    accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
    history.append(row)
    if accelerator.is_main_process:
        with open(output_dir / LOG_FILE, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def _plain_model(accelerator, encoder, sharded: ShardedModel | None) -> torch.nn.Module | None:
    """The trained model as one process can run and save it (on the main process): the unwrapped model, or under
    FSDP a plain copy holding the gathered weights (every process must call this then)."""
    if sharded is None:
        return accelerator.unwrap_model(encoder)
    plain = sharded.gather(encoder)
    return plain.to(accelerator.device) if plain is not None else None


def _evaluate(accelerator, encoder, evaluator, export_best, state: TrainState, output_dir: Path, history: list,
              sharded: ShardedModel | None = None) -> dict | None:  # fmt: skip
    """Run the evaluator on the main process and keep ``best/`` (unless ``export_best`` is None: the baseline),
    without touching the training RNG or the model's training mode. Returns the results on the main process.
    Under FSDP it evaluates a gathered copy (:func:`_plain_model`): the evaluators are one-process code."""
    results = None
    model = _plain_model(accelerator, encoder, sharded)
    if accelerator.is_main_process:
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        was_training = model.training  # encoding (sentence-transformers' encode) leaves the model in eval mode
        # evaluating and exporting (the card encodes examples) must not change training
        with torch.random.fork_rng(devices=devices):
            results = evaluator(model)
            metric = results[results["primary_metric"]]
            if export_best is not None and (state.best_metric is None or metric > state.best_metric):
                state.best_metric, state.best_step = metric, state.step
                export_best(model, results)
        model.train(was_training)
        row = {f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))}
        _log(accelerator, output_dir, history, {"step": state.step, **row})
        accelerator.print(f"step {state.step}: {results['primary_metric']} = {metric:.2f}")
    # only the main process writes trainer_state.json, so only it needs to know the best metric
    accelerator.wait_for_everyone()
    return results


def _recorded_evaluation(output_dir: Path, step: int) -> dict | None:
    """The results of the evaluation at ``step``, as an export of that step recorded them (``final/`` or ``best/``,
    their ``eval_results.json``), or ``None``: what a resumed run that trains no further step puts on its card."""
    for folder in ("final", "best"):
        try:
            recorded = json.loads((output_dir / folder / "eval_results.json").read_text())
        except (OSError, ValueError):
            continue
        if isinstance(recorded, dict) and recorded.get("step") == step and "primary_metric" in recorded:
            return {k: v for k, v in recorded.items() if k != "step"}
    return None


def _print_before_after(accelerator, baseline: dict | None, state: TrainState) -> None:
    before = baseline[baseline["primary_metric"]] if baseline else None
    start = f"{before:.2f} before training -> " if before is not None else ""
    accelerator.print(f"{start}best {state.best_metric:.2f} at step {state.best_step} (saved in best/)")


def _run_summary(config: RunConfig, loss_fn, steps: int, results: dict | None) -> RunSummary:
    """What ``best/`` and ``final/`` say about this run (their cards, ``training_config.yaml``): no path of this machine."""
    return RunSummary(portable_config(config.to_dict()), loss_fn.get_config_dict(), loss_fn.citation, steps, results,
                      split=config.training.eval_split, base_model=hub_id_of(config.model.model_name_or_path))  # fmt: skip

