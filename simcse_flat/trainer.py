"""The training loop: accelerate, read top to bottom, as nanoGPT's ``train.py`` reads.

``train(config)`` builds the run, then loops (:func:`_train`, in short)::

    run = build_run(config, ...)          # config -> modality -> parts -> loader, loss, optimizer (accelerate's
                                          # prepare; sharded under FSDP) -> the checkpoint resumed -> the folder
                                          # claimed (simcse_flat.run)
    baseline = start_training(run)        # the step-0 evaluation, the model in training mode
    while run.state.step < run.total_steps:
        for batch in epoch_batches(run):
            if train_step(run, batch):    # one micro-batch: forward all views once, gather, loss (fp32), backward;
                on_step_end(run)          #   the step's last also clips, steps, schedules; then log, evaluate, save
    return finish(run, baseline)          # the last checkpoint, final/ exported by the modality

Mixed precision, gradient accumulation and multi-GPU / multi-node all come from ``accelerate`` (run with
``accelerate launch``); sharding (FSDP2) too, with what it needs besides (the gathered model that is evaluated and
exported, the checkpoints' full state) in :mod:`simcse_flat.sharding`. Note that accumulation enlarges the gradient's
batch, not the negatives: each micro-batch is contrasted only with itself, which is exactly where FlatNCE and EMC²
help. ``grad_cache_chunk_size`` (:mod:`simcse_flat.grad_cache`) is the way to more negatives in the same memory.

The loop reads the device on the host once per optimizer step (the finiteness check, in the step's last micro-batch)
and once per logged row, in no other micro-batch (:mod:`simcse_flat.step_metrics`; EMC² reads more: ``docs/design.md``
counts them).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import TrainState, checkpoint_path, list_checkpoints, save_checkpoint
from .config import RunConfig
from .export import RunSummary, portable_config
from .run import Run, build_run
from .run_folder import LOG_FILE, RunLock
from .step_metrics import Window
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
    run = build_run(config, evaluator, lock)
    baseline = start_training(run)
    while run.state.step < run.total_steps:
        for batch in epoch_batches(run):
            if train_step(run, batch):  # the micro-batch that ends an optimizer step
                on_step_end(run)
                if run.state.step >= run.total_steps:
                    break
        else:  # the epoch ran out before total_steps
            run.state.epoch += 1
            run.state.batch_in_epoch = 0
    return finish(run, baseline)


# ---- the loop: train_step, then on_step_end at the end of each optimizer step -----------------------------------


def start_training(run: Run) -> dict | None:
    """The evaluation the run starts from (step 0's, or the resumed checkpoint's as recorded), for the before/after
    line; the progress bar and the first logging window; the model in training mode."""
    run.progress = tqdm(total=run.total_steps, initial=run.state.step,
                        disable=not run.accelerator.is_local_main_process, desc="train")  # fmt: skip
    if run.evaluating and run.state.step == 0:  # never "best"
        run.last_eval = _evaluate(run, keep_best=False)
        if run.sharded is not None:
            run.sharded.release()  # step 0's gathered weights: not held through the first step
    elif run.evaluating:  # resumed: the checkpoint's evaluation, for final/'s card if no step follows
        run.last_eval = _recorded_evaluation(run.output_dir, run.state.step)
    run.window = Window(run.state.step)
    run.model.train()
    return run.last_eval


def epoch_batches(run: Run) -> DataLoader:
    """This epoch's batches from the position in it (a resumed run skips those it trained)."""
    state, loader = run.state, run.loader
    if state.batch_in_epoch:
        loader = run.accelerator.skip_first_batches(loader, state.batch_in_epoch)
    # accelerate's loader hands its own epoch counter to the sampler on each pass; set it to ours
    loader.set_epoch(state.epoch)
    # and to the sampler itself: accelerate's set_epoch does not reach a sampler wrapped for sharding or
    # skipping, which left a resumed epoch on several processes on epoch 0's order
    run.batches.set_epoch(state.epoch)
    return loader


def train_step(run: Run, batch: dict) -> bool:
    """One micro-batch: forward every view once, the loss, backward; on the step's last micro-batch, clip, check
    finiteness (the step's one read on the host), step the optimizer and the schedule. True when a step ended."""
    accelerator, args = run.accelerator, run.args
    with accelerator.accumulate(run.model):
        sample_ids = batch.pop("sample_ids")
        keys = batch.pop("sample_keys", None)  # content keys: an anchor's duplicates are not its negatives
        loss, metrics = contrastive_loss_on_views(
            run.loss_fn, run.encode(batch), sample_ids, run.parts.symmetric, run.encode_samples,
            run.parts.negatives, keys if run.config.loss.mask_duplicates else None,
        )  # fmt: skip
        run.finite.note("loss", loss.detach())  # on the device: read once a step, below
        accelerator.backward(loss)
        if run.cache is not None:  # the loss's gradient stopped at the cached embeddings; on into the encoder
            run.cache.backward()
        if accelerator.sync_gradients and args.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
            if accelerator.mixed_precision != "fp16":  # fp16's scaler skips such a step by design
                run.finite.note("gradient norm", norm)
        if accelerator.sync_gradients:  # before the weights change: one reduce and one read a step
            run.finite.stop_if_not(accelerator, run.state, run.output_dir)
        run.optimizer.step()  # accelerate makes these no-ops until the last micro-batch of the step
        run.optimizer.zero_grad()
    run.state.batch_in_epoch += 1
    run.window.add({"loss": loss.detach(), **metrics})
    if not accelerator.sync_gradients:
        return False
    if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the scaler skipped this step
        run.scheduler.step()
    run.state.step += 1
    run.progress.update(1)
    return True


def on_step_end(run: Run) -> None:
    """After an optimizer step, what its number asks for: a logged row, an evaluation, a checkpoint."""
    step, args = run.state.step, run.args
    if step % args.logging_steps == 0 or step == run.total_steps:
        _log_window(run)
    if run.evaluating and (step % args.eval_steps == 0 or step == run.total_steps):
        run.last_eval = _evaluate(run, keep_best=True)
    if args.save_steps > 0 and step % args.save_steps == 0:
        save_checkpoint(run.accelerator, run.output_dir, run.state, run.config_yaml, args.save_total_limit,
                        run.trainables)  # fmt: skip
    if run.sharded is not None and step < run.total_steps:
        run.sharded.release()  # this step's gathered weights served its evaluation and checkpoint; the last step's
        # serve finish() too


def _log_window(run: Run) -> None:
    """The mean over every micro-batch of the window since the last row (transformers' Trainer averages the window
    too); a step the epoch's end cut short counts its micro-batches only."""
    means, seconds_per_step = run.window.close(run.accelerator, run.state.step)
    row = {**means, "lr": run.scheduler.get_last_lr()[0], "epoch": run.state.epoch}
    row["seconds_per_step"] = seconds_per_step
    _log(run, {"step": run.state.step, **row})
    run.progress.set_postfix(loss=f"{row['loss']:.4g}", infonce=f"{row['infonce']:.3g}")


def finish(run: Run, baseline: dict | None) -> TrainResult:
    """The last checkpoint (unless the last step wrote it) and ``final/``, exported by the modality with its card."""
    accelerator, state = run.accelerator, run.state
    run.progress.close()
    if checkpoint_path(run.output_dir, state.step) not in list_checkpoints(run.output_dir, only_ours=True):
        save_checkpoint(accelerator, run.output_dir, state, run.config_yaml, run.args.save_total_limit, run.trainables)
    final = run.output_dir / "final"
    trained = _plain_model(run)  # under FSDP every process takes part in gathering it
    if accelerator.is_main_process:  # final/ is this run's own
        run.config.modality.export(trained, final, overwrite=True, summary=_run_summary(run, run.last_eval))
        if run.evaluating and state.best_step is not None:
            _print_before_after(accelerator, baseline, state)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(run.output_dir, final, state, run.history)


# ---- helpers, in the order the loop uses them -------------------------------------------------------------------


def _log(run: Run, row: dict) -> None:
    """To the trackers, to the returned history, and to ``log.jsonl`` (plain text that survives a kill)."""
    run.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    run.history.append(row)
    if run.accelerator.is_main_process:
        with open(run.output_dir / LOG_FILE, "a") as handle:
            handle.write(json.dumps(row) + "\n")


def _plain_model(run: Run) -> torch.nn.Module | None:
    """The trained model as one process can run and save it (on the main process): the unwrapped model, or under
    FSDP a plain copy holding the gathered weights (every process must call this then; the others get ``None``)."""
    if run.sharded is None:
        return run.accelerator.unwrap_model(run.model)
    plain = run.sharded.gather(run.model, run.state.step)
    return plain.to(run.accelerator.device) if plain is not None else None


def _evaluate(run: Run, keep_best: bool) -> dict | None:
    """Run the evaluator on the main process and, if ``keep_best`` (not the baseline), keep ``best/``, without
    touching the training RNG or the model's training mode. Returns the results on the main process.
    Under FSDP it evaluates a gathered copy (:func:`_plain_model`): the evaluators are one-process code."""
    accelerator, state = run.accelerator, run.state
    results = None
    model = _plain_model(run)
    if accelerator.is_main_process:
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        was_training = model.training  # encoding (sentence-transformers' encode) leaves the model in eval mode
        # evaluating and exporting (the card encodes examples) must not change training
        with torch.random.fork_rng(devices=devices):
            results = run.evaluator(model)
            metric = results[results["primary_metric"]]
            if keep_best and (state.best_metric is None or metric > state.best_metric):
                state.best_metric, state.best_step = metric, state.step
                # best/: the weights and the card of its own evaluation
                run.config.modality.export(model, run.output_dir / "best", overwrite=True,
                                           summary=_run_summary(run, results))  # fmt: skip
        model.train(was_training)
        row = {f"eval/{k}": v for k, v in results.items() if isinstance(v, (int, float))}
        _log(run, {"step": state.step, **row})
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


def _run_summary(run: Run, results: dict | None) -> RunSummary:
    """What ``best/`` and ``final/`` say about this run (cards, ``training_config.yaml``): no path of this machine."""
    config, loss_fn = run.config, run.loss_fn
    return RunSummary(portable_config(config.to_dict()), loss_fn.get_config_dict(), loss_fn.citation, run.state.step,
                      results, split=config.training.eval_split, base_model=run.parts.base_model)  # fmt: skip
