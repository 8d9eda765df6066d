"""Train one recipe with several losses (and batch sizes) and compare them on one table.

    python scripts/compare_losses.py --config configs/unsup_minilm_emc2.yaml --losses infonce flatnce sogclr emc2
    python scripts/compare_losses.py --config configs/quickstart.yaml --losses infonce flatnce --batch_sizes 4 16 64

Everything but the loss (and the batch size) comes from the config, so the runs differ in one thing. Each run
evaluates as its config says (``eval_steps``); the table gives the metric before training, the best metric and its
step, the final InfoNCE / FlatNCE of the training logits, and the wall time. Extra ``--key value`` flags are passed
to every run (e.g. ``--max_steps 50``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from simcse_flat.cli import quiet_transformers
from simcse_flat.config import parse_config
from simcse_flat.trainer import train_from_config


def run_one(config_file: str, loss: str, batch_size: int | None, out: Path, extra: list[str]) -> dict:
    name = f"{loss}" + (f"_b{batch_size}" if batch_size else "")
    argv = ["--config", config_file, "--loss", loss, "--output_dir", str(out / name), "--report_to", "none", *extra]
    if batch_size:
        argv += ["--per_device_train_batch_size", str(batch_size)]
    config = parse_config(argv)
    start = time.perf_counter()
    result = train_from_config(config)
    seconds = time.perf_counter() - start
    evals = [row for row in result.history if any(k.startswith("eval/") for k in row)]
    train_rows = [row for row in result.history if "loss" in row]
    primary = next((k for k in evals[0] if k.startswith("eval/") and k.endswith("_spearman")), None) if evals else None
    return {
        "run": name,
        "before": evals[0][primary] if evals and evals[0]["step"] == 0 else None,
        "best": result.state.best_metric,
        "best_step": result.state.best_step,
        "infonce": train_rows[-1]["infonce"] if train_rows else None,
        "flatnce": train_rows[-1]["flatnce"] if train_rows else None,
        "steps": result.state.step,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--losses", nargs="+", default=["infonce", "flatnce"])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[None])
    parser.add_argument("--output_dir", default="runs/compare_losses")
    args, extra = parser.parse_known_args()
    quiet_transformers()
    rows = [
        run_one(args.config, loss, batch, Path(args.output_dir), extra)
        for batch in args.batch_sizes
        for loss in args.losses
    ]
    print(f"\n{args.config} {' '.join(extra)}")
    print("| run | before | best (step) | final infonce | final flatnce | steps | wall |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        before = f"{r['before']:.2f}" if r["before"] is not None else "-"
        best = f"{r['best']:.2f} ({r['best_step']})" if r["best"] is not None else "-"
        print(f"| {r['run']} | {before} | {best} | {r['infonce']:.3g} | {r['flatnce']:.3g} | {r['steps']} | "
              f"{r['seconds'] / 60:.1f} min |")  # fmt: skip


if __name__ == "__main__":
    main()
