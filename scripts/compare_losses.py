"""Train one recipe with several losses (and batch sizes, and seeds) and compare them on one table, a CSV and a plot.

    python scripts/compare_losses.py --config configs/unsup_minilm_emc2.yaml --losses infonce flatnce sogclr emc2
    python scripts/compare_losses.py --config configs/quickstart.yaml --losses infonce flatnce --batch_sizes 4 16 64
    python scripts/compare_losses.py --config configs/quickstart.yaml --losses infonce flatnce --seeds 1 2 3 \
        --test_data_dir ../shared/data/senteval                                # text: + STS12-16, STS-B, SICK-R test

    python scripts/compare_losses.py --config configs/vision_fmnist_emc2.yaml --losses infonce flatnce emc2 \
        --max_steps 3000                                                       # vision: + linear probe and kNN

    python scripts/compare_losses.py --config configs/scratch_study.yaml --losses infonce flatnce \
        --batch_sizes 8 32 128 --seeds 1 2 3 --examples 16384 --lr_scaling sqrt \
        --tune_learning_rates 3e-4 1e-3 --tune_temperatures 0.05 0.1     # the batch-size study (docs/benchmarks.md)

Everything but the loss (and the batch size, and the seed) comes from the config, so the runs differ in one thing.
Each run evaluates as its config says (``eval_steps``); the table gives the metric before training, at the end, and
at its best (with the step: a choice made on the evaluation data, so optimistic where that is a dev split), the
final InfoNCE / FlatNCE of the training logits, and the training time. ``--test_data_dir`` adds, for text, the mean
of SentEval's seven STS test sets for each ``final/`` model. A vision config adds the linear probe and kNN accuracy
of each ``final/`` model (``--probe_train_samples`` / ``--probe_test_samples`` labelled images) and a first row for
the same architecture untrained. Extra ``--key value`` flags are passed to every run (e.g. ``--max_steps 50``).

A sweep over batch sizes:

* ``--examples N`` gives every run the same data (``max_steps`` = N / batch, evaluated every quarter of it):
  equal examples, equal compute; without it every run takes the config's ``max_steps`` (equal steps).
* ``--lr_scaling none | linear | sqrt`` (default: the config's ``lr_scaling``) is the trainer's one rule
  (:mod:`simcse_flat.optim`), set for every run; the learning rate it starts from (the tuned one, else the one the
  config and ``--learning_rate`` give, after the config's own scaling) is the one at ``--base_batch_size``, so the
  runs train with that rate times ``B / base`` (linear) or ``√(B / base)`` (sqrt). A config that sets
  ``lr_scaling`` itself is not scaled twice: the runs' flag replaces it.
* ``--tune_learning_rates`` x ``--tune_temperatures``: each loss first trains at the base batch size and
  ``--tune_seed`` (default: the first of ``--seeds``) with every pair, and keeps the pair whose final dev score is
  highest (it prints which it got).

Every sweep writes ``results.csv`` in ``--output_dir`` (a row per run; ``--results`` elsewhere) and, with two batch sizes or more, a plot
(``--plot``, PNG): the metric's final value against the batch size (log 2), a line per loss with its mean +- sd over
seeds, and the untrained model as a horizontal line (text: the step-0 evaluation; vision: the untrained probe).

Runs are resumed (``--resume_from latest``): rerun the same command after a kill and finished runs are read back
(``sweep_row.json`` in each run's folder), the interrupted one continues from its last checkpoint, and the rest
train. Several copies of the command, each with some of the losses and the same ``--output_dir``, share the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from simcse_flat.cli import quiet_transformers, run_cli
from simcse_flat.config import parse_config
from simcse_flat.evaluation import TASK_NAMES, StsTask, load_sts_tasks
from simcse_flat.optim import LR_SCALINGS, configured_learning_rate, scaled_learning_rate
from simcse_flat.run_folder import read_log, write_text_atomically
from simcse_flat.trainer import train

ROW_FILE = "sweep_row.json"  # a finished run's row, so that a rerun reads it instead of loading the run again
CSV_COLUMNS = ("loss", "batch_size", "seed", "learning_rate", "temperature", "steps", "examples", "untrained",
               "dev_best", "dev_final", "test_mean", "linear", "knn", "seconds", "peak_memory_mb", "run")  # fmt: skip


@dataclass
class Sweep:
    """What differs between the runs of one command, beside the loss, batch size and seed."""

    config_file: str
    out: Path
    extra: list[str]
    probe: dict
    test_tasks: list[StsTask] | None
    examples: int | None = None
    lr_scaling: str = "none"  # the trainer's rule the runs get (optim.py)
    base_batch_size: int = 0  # 0: the config's
    base_learning_rate: float | None = None  # the rate the config gives at base_batch_size (after its own rule)
    config_lr_scaling: str = "none"  # the config's own rule: kept as it is when the sweep sets the same and no rate
    accumulation: int = 1  # the config's gradient_accumulation_steps: B = batch_size x accumulation (one process)

    def settings(self, batch_size: int | None, learning_rate: float | None, temperature: float | None) -> list[str]:
        """The flags a run gets for its batch size: steps from the data budget, the scaled learning rate. They come
        after the extra flags, so they win: ``--learning_rate`` there is the base the rule scales."""
        flags = []
        if temperature is not None:
            flags += ["--temperature", repr(temperature)]
        base_lr = learning_rate if learning_rate is not None else self.base_learning_rate
        if base_lr is not None and (learning_rate is not None or self.lr_scaling != self.config_lr_scaling):
            # the rate at the base batch, configured for the trainer's rule: it scales it, once
            base = self.base_batch_size * self.accumulation
            flags += ["--lr_scaling", self.lr_scaling,
                      "--learning_rate", repr(configured_learning_rate(base_lr, base, self.lr_scaling))]  # fmt: skip
        if self.examples and batch_size:
            steps = math.ceil(self.examples / batch_size)
            flags += ["--max_steps", str(steps), "--eval_steps", str(max(1, steps // 4)),
                      "--save_steps", str(max(1, steps // 2))]  # fmt: skip
        return flags


def run_one(sweep: Sweep, loss: str, batch_size: int | None, seed: int | None, folder: Path | None = None,
            learning_rate: float | None = None, temperature: float | None = None) -> dict:  # fmt: skip
    """Train one run (or continue it, or read it back if it finished) and summarise it from its ``log.jsonl``."""
    name = f"{loss}" + (f"_b{batch_size}" if batch_size else "") + (f"_seed{seed}" if seed is not None else "")
    output_dir = (folder or sweep.out) / name
    if (output_dir / ROW_FILE).exists():
        return json.loads((output_dir / ROW_FILE).read_text())
    argv = ["--config", sweep.config_file, "--loss", loss, "--output_dir", str(output_dir), "--report_to", "none",
            "--resume_from", "latest", *sweep.extra, *sweep.settings(batch_size, learning_rate, temperature)]  # fmt: skip
    if batch_size:
        argv += ["--per_device_train_batch_size", str(batch_size)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    config = parse_config(argv)
    reset_peak_memory()
    start = time.perf_counter()
    result = train(config)  # a finished run resumes at its last step and trains nothing
    log = read_log(result.output_dir)  # the whole run, across resumes
    evals = [row for row in log if any(k.startswith("eval/") for k in row)]
    train_rows = [row for row in log if "loss" in row]
    primary = f"eval/{config.modality.primary_metric(config)}"
    args = config.training
    step_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps  # one process
    row = {
        "run": name,
        "loss": loss,
        "batch_size": args.per_device_train_batch_size,
        "seed": args.seed,
        "learning_rate": scaled_learning_rate(args.learning_rate, step_batch, args.lr_scaling),  # what it trained at
        "temperature": config.loss.temperature,
        "before": evals[0][primary] if evals and evals[0]["step"] == 0 else None,
        "final": evals[-1][primary] if evals else None,  # the last eval: no selection on dev
        "best": result.state.best_metric,
        "best_step": result.state.best_step,
        "infonce": train_rows[-1]["infonce"] if train_rows else None,
        "flatnce": train_rows[-1]["flatnce"] if train_rows else None,
        "steps": result.state.step,
        "examples": result.state.step * args.per_device_train_batch_size * args.gradient_accumulation_steps,
        "seconds": training_seconds(train_rows),
        "wall_seconds": time.perf_counter() - start,  # this sitting's: training, evaluations, saving
    }
    row.update(config.modality.final_scores(config, result.final_model, sweep.probe, sweep.test_tasks))
    row["peak_memory_mb"] = peak_memory_mb()
    write_text_atomically(output_dir / ROW_FILE, json.dumps(row))
    return row


def reset_peak_memory() -> None:
    """Start a run's peak-memory count afresh (GPU: the allocator's peak; CPU: Linux's resident high-water mark)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM (Linux >= 4.0)
    except OSError:
        pass  # not Linux: the count is the process's since it started


def peak_memory_mb() -> float | None:
    """The peak since :func:`reset_peak_memory`: GPU memory allocated on a GPU, else resident memory."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return kib / 1024 if kib is not None else None


def tune(sweep: Sweep, loss: str, batch_size: int | None, seed: int | None, learning_rates: list[float],
         temperatures: list[float]) -> tuple[float | None, float | None, list[dict]]:  # fmt: skip
    """Each (learning rate, temperature) pair at one batch size and seed; the pair with the best final score."""
    rows = []
    for lr in learning_rates or [None]:
        for tau in temperatures or [None]:
            pair = f"lr{lr:g}_" if lr is not None else ""
            pair += f"tau{tau:g}" if tau is not None else ""
            row = run_one(sweep, loss, batch_size, seed, sweep.out / "tune" / pair.strip("_"), lr, tau)
            rows.append({**row, "run": f"tune/{pair.strip('_')}/{row['run']}", "tuning": True})
    chosen = max(rows, key=lambda r: -math.inf if r["final"] is None else r["final"])
    return (chosen["learning_rate"] if learning_rates else None), (chosen["temperature"] if temperatures else None), rows


def training_seconds(train_rows: list[dict]) -> float:
    """Wall time of the logged steps (each row's seconds per step over the steps since the row before)."""
    steps = [0] + [row["step"] for row in train_rows]
    return sum(row["seconds_per_step"] * (step - before) for row, step, before in zip(train_rows, steps[1:], steps))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--losses", nargs="+", default=["infonce", "flatnce"])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[None])
    parser.add_argument("--seeds", nargs="+", type=int, default=[None], help="one run per seed; default: the config's")
    parser.add_argument("--output_dir", default="runs/compare_losses")
    parser.add_argument("--examples", type=int, help="a data budget: every run trains on N examples (steps = N / batch)")
    parser.add_argument("--lr_scaling", choices=tuple(LR_SCALINGS),
                        help="the trainer's rule for every run, from the rate at --base_batch_size: x (batch / base) "
                        "or its square root (default: the config's lr_scaling)")  # fmt: skip
    parser.add_argument("--base_batch_size", type=int, help="the batch the learning rate is given for, and where "
                        "tuning runs (default: the config's per_device_train_batch_size)")  # fmt: skip
    parser.add_argument("--tune_learning_rates", nargs="+", type=float, default=[], metavar="LR")
    parser.add_argument("--tune_temperatures", nargs="+", type=float, default=[], metavar="TAU")
    parser.add_argument("--tune_seed", type=int, help="the seed the tuning runs take (default: the first of --seeds)")
    parser.add_argument("--plot", help="the plot's PNG (default: plot.png in --output_dir, with 2+ batch sizes)")
    parser.add_argument("--results", help="the CSV of all runs (default: results.csv in --output_dir)")
    parser.add_argument("--probe_train_samples", type=int, default=10_000, help="vision: labelled images to fit on")
    parser.add_argument("--probe_test_samples", type=int, default=2_000, help="vision: labelled images to score")
    parser.add_argument("--test_data_dir", help="text: also score each final model on SentEval's STS test sets "
                        "in this folder (the 'test' column: their mean, untruncated)")  # fmt: skip
    parser.add_argument("--test_tasks", nargs="+", choices=TASK_NAMES, default=list(TASK_NAMES), metavar="TASK",
                        help="with --test_data_dir (default: all seven)")  # fmt: skip
    args, extra = parser.parse_known_args(argv)
    quiet_transformers()
    probe = {"max_train": args.probe_train_samples, "max_test": args.probe_test_samples}
    # read (and checked) before any training, so a bad folder fails now rather than after the first run
    test_tasks = load_sts_tasks(args.test_tasks, args.test_data_dir, "test") if args.test_data_dir else None
    baseline = parse_config(["--config", args.config, *extra])
    training = baseline.training
    base_batch = args.base_batch_size or training.per_device_train_batch_size
    # the rate the config trains with at the base batch: its learning_rate after its own lr_scaling
    base_lr = scaled_learning_rate(training.learning_rate, base_batch * training.gradient_accumulation_steps,
                                   training.lr_scaling)  # fmt: skip
    sweep = Sweep(args.config, Path(args.output_dir), extra, probe, test_tasks, args.examples,
                  args.lr_scaling or training.lr_scaling, base_batch, base_lr, training.lr_scaling,
                  training.gradient_accumulation_steps)  # fmt: skip
    tune_seed = args.tune_seed if args.tune_seed is not None else args.seeds[0]
    untrained = baseline.modality.untrained_scores(baseline, probe)
    rows = [{"run": "untrained", **untrained}] if untrained is not None else []
    chosen = {}
    for loss in args.losses:
        if args.tune_learning_rates or args.tune_temperatures:
            lr, tau, tuning = tune(sweep, loss, base_batch, tune_seed, args.tune_learning_rates,
                                   args.tune_temperatures)  # fmt: skip
            rows += tuning
            chosen[loss] = (lr, tau)
            print(f"{loss}: learning rate {lr} and temperature {tau} at batch {base_batch}, seed {tune_seed} "
                  "(best final dev score)")  # fmt: skip
    rows += [
        run_one(sweep, loss, batch, seed, None, *chosen.get(loss, (None, None)))
        for seed in args.seeds  # a seed's whole curve first: a sweep stopped early has complete curves
        for batch in args.batch_sizes
        for loss in args.losses
    ]
    print(f"\n{args.config} {' '.join(extra)}")
    print(format_table(rows))
    if len(args.seeds) > 1:
        print(format_seed_summary([r for r in rows if not r.get("tuning")]))
    write_results(rows, Path(args.results or sweep.out / "results.csv"), untrained)
    if len([b for b in args.batch_sizes if b]) > 1:
        metric = "linear" if untrained is not None else "final"
        plot = Path(args.plot or sweep.out / "plot.png")
        if plot_against_batch([r for r in rows if not r.get("tuning") and r.get("loss")], metric, plot,
                              untrained.get(metric) if untrained else None, title=Path(args.config).stem):  # fmt: skip
            print(f"plot: {plot}")
        else:
            print(f"no plot: no run has a {metric!r} score (evaluation off?)")
    return rows


def write_results(rows: list[dict], path: Path, untrained: dict | None) -> None:
    """``results.csv``: a row per run (the tuning runs' names start with ``tune/``)."""
    lines = []
    for r in rows:
        if not r.get("loss"):
            continue
        cells = {
            **{k: r.get(k) for k in CSV_COLUMNS},
            "untrained": r.get("before") if untrained is None else untrained.get("linear"),
            "dev_best": r.get("best"),
            "dev_final": r.get("final"),
            "test_mean": r.get("test"),
            "seconds": round(r["wall_seconds"], 1) if r.get("wall_seconds") is not None else None,
            "run": r["run"],
        }
        lines.append(cells)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in line.items()} for line in lines)


def _cell(value):
    return "" if value is None else round(value, 4) if isinstance(value, float) else value


def curves(rows: list[dict], metric: str) -> dict[str, list[tuple[int, float, float, int]]]:
    """Per loss, ``(batch size, mean, sd, seeds)`` of ``metric`` over the seeds, by batch size (sd 0 for one seed)."""
    result = {}
    for loss in dict.fromkeys(r["loss"] for r in rows):
        points = []
        for batch in sorted({r["batch_size"] for r in rows if r["loss"] == loss}):
            values = [r[metric] for r in rows
                      if r["loss"] == loss and r["batch_size"] == batch and r.get(metric) is not None]  # fmt: skip
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                points.append((batch, statistics.fmean(values), sd, len(values)))
        result[loss] = points
    return result


def plot_against_batch(rows: list[dict], metric: str, path: Path, untrained: float | None, title: str) -> bool:
    """``metric`` against batch size (log 2): a line per loss, mean +- sd over seeds as a band; the untrained
    model's score (given, or the mean of the runs' step-0 evaluations) as a horizontal line. Draws nothing and
    returns False when no run has the metric (a sweep without evaluation)."""
    lines = {loss: points for loss, points in curves(rows, metric).items() if points}
    if not lines:
        return False
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for loss, points in lines.items():
        batches, means, sds, _ = zip(*points)
        (line,) = ax.plot(batches, means, marker="o", label=loss)
        ax.fill_between(batches, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)],
                        color=line.get_color(), alpha=0.2)  # fmt: skip
    befores = [r["before"] for r in rows if r.get("before") is not None]
    if untrained is None and befores:
        untrained = statistics.fmean(befores)
    if untrained is not None:
        ax.axhline(untrained, color="gray", linestyle="--", label="untrained")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (examples)")
    ax.set_ylabel({"final": "STS-B dev Spearman x100 (final)", "linear": "linear probe accuracy"}.get(metric, metric))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def format_seed_summary(rows: list[dict]) -> str:
    """Mean ± standard deviation over the seeds of each loss (and batch size), for every metric the rows have."""
    metrics = [k for k in ("final", "best", "test", "linear", "knn") if any(r.get(k) is not None for r in rows)]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if "_seed" in r["run"]:
            groups.setdefault(r["run"].rsplit("_seed", 1)[0], []).append(r)
    lines = ["| run | seeds | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
    for name, group in groups.items():
        cells = []
        for metric in metrics:
            values = [r[metric] for r in group if r.get(metric) is not None]
            spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
            cells.append(f"{statistics.fmean(values):.2f}{spread}" if values else "-")
        lines.append(f"| {name} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """A markdown table; the test and probe columns only when some row has them."""
    scores = [(key, title) for key, title in (("test", "STS test avg"), ("linear", "linear probe"), ("knn", "kNN"))
              if any(key in r for r in rows)]  # fmt: skip
    lines = ["| run | before | final | best (step) | final infonce | final flatnce | steps | train time |"
             + "".join(f" {title} |" for _, title in scores),
             "|---|" + "---:|" * (7 + len(scores))]  # fmt: skip
    for r in rows:
        cells = [
            r["run"],
            _number(r.get("before")),
            _number(r.get("final")),
            f"{r['best']:.2f} ({r['best_step']})" if r.get("best") is not None else "-",
            _number(r.get("infonce"), ".3g"),
            _number(r.get("flatnce"), ".3g"),
            str(r["steps"]) if "steps" in r else "-",
            f"{r['seconds'] / 60:.1f} min" if "seconds" in r else "-",
            *(_number(r.get(key)) for key, _ in scores),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


if __name__ == "__main__":
    sys.exit(run_cli(main))
