"""The table, CSV and plots of ``scripts/bench_global_loss.py``, from the finished runs' ``bench_row.json``.

    python scripts/global_loss_report.py runs/global_loss                      # the table again, CSV and plots rewritten
    python scripts/global_loss_report.py --table docs/global_loss_results.csv  # the table of a committed CSV
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import sys
from pathlib import Path

COLUMNS = ("problem", "m", "method", "estimator", "seed", "steps", "epochs", "L_report", "L_final", "L_full_batch",
           "L_above_full", "grad_error", "u_error", "emc2_acceptance", "emc2_encoded", "stsb_dev", "linear", "knn",
           "seconds")  # fmt: skip


def finished_rows(output_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(output_dir).glob("*/bench_row.json"))]


def value_at(trace: list[dict], key: str, epoch: float) -> float | None:
    """``key`` at the last measured point at or before ``epoch`` (``None`` if the run never got there)."""
    points = [p for p in trace if p.get(key) is not None and p["epoch"] <= epoch + 1e-9]
    return points[-1][key] if points and points[-1]["epoch"] >= epoch - 1e-9 else None


def mean_of(trace: list[dict], key: str, after_epoch: float, upto_epoch: float) -> float | None:
    """The mean of ``key`` over the points in (``after_epoch``, ``upto_epoch``]."""
    values = [p[key] for p in trace if p.get(key) is not None and after_epoch < p["epoch"] <= upto_epoch + 1e-9]
    return statistics.fmean(values) if values else None


def csv_rows(rows: list[dict], report_epochs: list[float]) -> list[dict]:
    """One row per finished run and reported epoch: L there, and how far above the full-batch run of the same
    problem and seed at the same step (the reference trajectory)."""
    full = {(r["problem"], r["m"], r["seed"]): r for r in rows if r["method"] == "full_batch"}
    out = []
    for row in rows:
        reference = full.get((row["problem"], row["m"], row["seed"]))
        for epoch in report_epochs:
            L = value_at(row["trace"], "L", epoch)
            if L is None:
                continue
            L_full = value_at(reference["trace"], "L", epoch) if reference else None
            out.append({
                **{k: row.get(k) for k in ("problem", "m", "method", "estimator", "seed", "steps", "stsb_dev", "linear",
                                           "knn", "seconds")},  # fmt: skip
                "epochs": epoch, "L_report": L, "L_final": row["trace"][-1]["L"], "L_full_batch": L_full,
                "L_above_full": None if L_full is None else L - L_full,
                "grad_error": mean_of(row["trace"], "grad_error", min(1.0, epoch / 2), epoch),  # past the start
                "u_error": value_at(row["trace"], "u_error", epoch),
                "emc2_acceptance": mean_of(row["trace"], "emc2_acceptance", 0.0, epoch),
                "emc2_encoded": mean_of(row["trace"], "emc2_encoded", 0.0, epoch),
            })  # fmt: skip
    return out


def _mean_sd(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"


def read_results(path: Path) -> list[dict]:
    """The rows of a results CSV, numbers as numbers (the runs behind it may be gone: ``runs/`` is not kept)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    text = ("problem", "method", "estimator")
    return [{k: v if k in text else (float(v) if v else None) for k, v in row.items()} for row in rows]


def markdown_table(rows: list[dict]) -> str:
    """Mean ± sd over seeds, a line per problem, reported epoch and method."""
    keys = ("L_report", "L_above_full", "grad_error", "u_error", "emc2_acceptance", "emc2_encoded", "stsb_dev",
            "linear", "knn")  # fmt: skip
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["problem"], row["m"], row["epochs"], row["method"]), []).append(row)
    lines = ["| problem | epochs | method | seeds | L | L − full batch | grad error | u error | acceptance | "
             "encoded | STS-B dev | linear | kNN |", "|" + "---|" * 13]  # fmt: skip
    for (problem, m, epochs, method), members in groups.items():
        cells = [_mean_sd([r[k] for r in members]) for k in keys]
        lines.append(f"| {problem} (m {m:g}) | {epochs:g} | {method} | {len(members)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], problem: str, m: int, path: Path) -> None:
    """L against step (log y) and the gradient error against step: a line per method, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    methods = sorted({r["method"] for r in rows if r["problem"] == problem and r["m"] == m})
    # L drops below 0 (τ 0.05): on a log axis, the gap to the lowest L any run reached (the full-batch run's), + 0.05
    lowest = min(p["L"] for r in rows if r["problem"] == problem and r["m"] == m for p in r["trace"]) - 0.05
    for method in methods:
        mine = [r for r in rows if r["problem"] == problem and r["m"] == m and r["method"] == method]
        traces = [r["trace"] for r in mine]
        style = {"color": "black", "linestyle": "--", "linewidth": 2} if method == "full_batch" else {}
        for axis, key in ((left, "L"), (right, "grad_error")):
            floor = lowest if key == "L" else 0.0
            steps = sorted({p["step"] for t in traces for p in t if p.get(key) is not None})
            means = [statistics.fmean([p[key] for t in traces for p in t if p["step"] == s and p.get(key) is not None])
                     - floor for s in steps]  # fmt: skip
            if steps and not (key == "grad_error" and method == "full_batch"):
                axis.plot(steps, means, label=f"{method} ({len(traces)} seeds)", **style)
    left.set(yscale="log", xlabel="optimizer step", ylabel=f"L(θ) − ({lowest:.2f}): the lowest L measured − 0.05", title=f"{problem}, m = {m}, batch 4")
    right.set(yscale="log", xlabel="optimizer step", ylabel="‖g − ∇L‖ / ‖∇L‖", title="gradient error of the step")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(output_dir: Path, results: Path, plot_dir: Path, report_epochs: list[float]) -> str:
    """Rewrite ``results`` (CSV) and the plots from every finished run in ``output_dir``; return the table."""
    rows = finished_rows(output_dir)
    flat = csv_rows(rows, report_epochs)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(flat)
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_suffix(f".{os.getpid()}.tmp")  # two copies of the benchmark may share the folder
    tmp.write_text(buffer.getvalue())
    tmp.replace(results)
    for problem, m in sorted({(r["problem"], r["m"]) for r in rows}):
        plot(rows, problem, m, Path(plot_dir) / f"global_loss_{problem}_m{m}.png")
    return markdown_table(flat)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        print(markdown_table(read_results(Path(sys.argv[2]))))
    else:
        folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/global_loss")
        print(write_report(folder, folder / "results.csv", folder, [10, 50]))
