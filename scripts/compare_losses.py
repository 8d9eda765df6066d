"""Train one recipe with several losses (and batch sizes, and seeds) and compare them on one table.

    python scripts/compare_losses.py --config configs/unsup_minilm_emc2.yaml --losses infonce flatnce sogclr emc2
    python scripts/compare_losses.py --config configs/quickstart.yaml --losses infonce flatnce --batch_sizes 4 16 64
    python scripts/compare_losses.py --config configs/quickstart.yaml --losses infonce flatnce --seeds 1 2 3 \
        --test_data_dir ../shared/data/senteval                                # text: + STS12-16, STS-B, SICK-R test

    python scripts/compare_losses.py --config configs/vision_fmnist_emc2.yaml --losses infonce flatnce emc2 \
        --max_steps 3000                                                       # vision: + linear probe and kNN

Everything but the loss (and the batch size, and the seed) comes from the config, so the runs differ in one thing.
Each run evaluates as its config says (``eval_steps``); the table gives the metric before training, at the end, and
at its best (with the step: a choice made on the evaluation data, so optimistic where that is a dev split), the
final InfoNCE / FlatNCE of the training logits, and the training time. ``--test_data_dir`` adds, for text, the mean
of SentEval's seven STS test sets for each ``final/`` model. A vision config adds the linear probe and kNN accuracy
of each ``final/`` model (``--probe_train_samples`` / ``--probe_test_samples`` labelled images) and a first row for
the same architecture untrained. Extra ``--key value`` flags are passed to every run (e.g. ``--max_steps 50``).

Runs are resumed (``--resume_from latest``): rerun the same command after a kill and finished runs are read back
from their ``log.jsonl``, the interrupted one continues from its last checkpoint, and the rest train; rerun it with
``--test_data_dir`` to score runs already made.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from simcse_flat.cli import quiet_transformers, run_cli
from simcse_flat.config import parse_config
from simcse_flat.evaluation import TASK_NAMES, StsTask, load_sts_tasks
from simcse_flat.modalities import final_model_scores, primary_metric, untrained_scores
from simcse_flat.run_folder import read_log
from simcse_flat.trainer import train_from_config


def run_one(config_file: str, loss: str, batch_size: int | None, seed: int | None, out: Path, extra: list[str],
            probe: dict, test_tasks: list[StsTask] | None) -> dict:  # fmt: skip
    """Train one run (or continue it, or read it back if it finished) and summarise it from its ``log.jsonl``."""
    name = f"{loss}" + (f"_b{batch_size}" if batch_size else "") + (f"_seed{seed}" if seed is not None else "")
    argv = ["--config", config_file, "--loss", loss, "--output_dir", str(out / name), "--report_to", "none",
            "--resume_from", "latest", *extra]  # fmt: skip
    if batch_size:
        argv += ["--per_device_train_batch_size", str(batch_size)]
    if seed is not None:
        argv += ["--seed", str(seed)]
    config = parse_config(argv)
    result = train_from_config(config)  # a finished run resumes at its last step and trains nothing
    log = read_log(result.output_dir)  # the whole run, across resumes
    evals = [row for row in log if any(k.startswith("eval/") for k in row)]
    train_rows = [row for row in log if "loss" in row]
    primary = f"eval/{primary_metric(config)}"
    row = {
        "run": name,
        "before": evals[0][primary] if evals and evals[0]["step"] == 0 else None,
        "final": evals[-1][primary] if evals else None,  # the last eval: no selection on dev
        "best": result.state.best_metric,
        "best_step": result.state.best_step,
        "infonce": train_rows[-1]["infonce"] if train_rows else None,
        "flatnce": train_rows[-1]["flatnce"] if train_rows else None,
        "steps": result.state.step,
        "seconds": training_seconds(train_rows),
    }
    row.update(final_model_scores(config, result.final_model, probe, test_tasks))
    return row


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
    parser.add_argument("--probe_train_samples", type=int, default=10_000, help="vision: labelled images to fit on")
    parser.add_argument("--probe_test_samples", type=int, default=2_000, help="vision: labelled images to score")
    parser.add_argument("--test_data_dir", help="text: also score each final model on SentEval's STS test sets "
                        "in this folder (the 'test' column: their mean, untruncated, as evaluate_sts.py)")  # fmt: skip
    parser.add_argument("--test_tasks", nargs="+", choices=TASK_NAMES, default=list(TASK_NAMES), metavar="TASK",
                        help="with --test_data_dir (default: all seven)")  # fmt: skip
    args, extra = parser.parse_known_args(argv)
    quiet_transformers()
    probe = {"max_train": args.probe_train_samples, "max_test": args.probe_test_samples}
    # read (and checked) before any training, so a bad folder fails now rather than after the first run
    test_tasks = load_sts_tasks(args.test_tasks, args.test_data_dir, "test") if args.test_data_dir else None
    baseline = parse_config(["--config", args.config, *extra])
    untrained = untrained_scores(baseline, probe)
    rows = [{"run": "untrained", **untrained}] if untrained is not None else []
    rows += [
        run_one(args.config, loss, batch, seed, Path(args.output_dir), extra, probe, test_tasks)
        for batch in args.batch_sizes
        for seed in args.seeds
        for loss in args.losses
    ]
    print(f"\n{args.config} {' '.join(extra)}")
    print(format_table(rows))
    if len(args.seeds) > 1:
        print(format_seed_summary(rows))
    return rows


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
