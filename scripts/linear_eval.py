"""Score a vision encoder: linear probe + kNN on frozen features (default), or full fine-tuning.

    python scripts/linear_eval.py runs/fmnist/final --data_root ../shared/data/vision/fashion-mnist
    python scripts/linear_eval.py runs/fmnist/checkpoint-300 --output results.json
    python scripts/linear_eval.py runs/fmnist/final --random_init        # the same architecture, untrained
    python scripts/linear_eval.py runs/fmnist/final --transfer_mode finetune --finetune_epochs 5

MODEL is a trained model folder (``final/``, ``best/``) or a training checkpoint (``checkpoint-N``).
``--dataset`` defaults to what the model was trained on. Prints a table; ``--output`` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from simcse_flat.cli import run_cli
from simcse_flat.config import ConfigError
from simcse_flat.modalities import VisionArguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="model folder or training checkpoint (optional with --random_init)")
    parser.add_argument("--dataset", help="a vision_dataset name; default: the one the model was trained on")
    parser.add_argument("--data_root", default=VisionArguments.data_root)
    parser.add_argument("--download", action="store_true", help="let torchvision download the data set")
    parser.add_argument("--transfer_mode", default="linear_eval", choices=["linear_eval", "finetune"])
    parser.add_argument("--random_init", action="store_true", help="score the architecture with untrained weights")
    parser.add_argument("--max_train_samples", type=int, help="a fixed random subset of the labelled train split")
    parser.add_argument("--max_test_samples", type=int, help="a fixed random subset of the test split")
    parser.add_argument("--finetune_epochs", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="for --random_init and fine-tuning")
    parser.add_argument("--output", help="write the results here as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from simcse_flat.vision import evaluate_encoder, load_encoder, model_config
    from simcse_flat.models.vision import VisionEncoder

    torch.manual_seed(args.seed)
    if args.model:
        encoder = load_encoder(args.model, random_init=args.random_init)
    elif args.random_init:
        encoder = VisionEncoder(model_config(VisionArguments(vision_dataset=args.dataset or "fashion_mnist")))
    else:
        raise ConfigError("give a MODEL folder or checkpoint, or --random_init")
    dataset = args.dataset or encoder.config.dataset
    start = time.perf_counter()
    results = evaluate_encoder(
        encoder, dataset, args.data_root, mode=args.transfer_mode, download=args.download,
        max_train=args.max_train_samples, max_test=args.max_test_samples, device=args.device,
        finetune_epochs=args.finetune_epochs,
    )  # fmt: skip
    row = {
        "model": args.model or encoder.config.arch,
        "weights": "random init" if args.random_init else "trained",
        "dataset": dataset,
        "transfer_mode": args.transfer_mode,
        **results,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(format_table(row))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(row, indent=2) + "\n")
    return row


def format_table(row: dict) -> str:
    """Two aligned columns, accuracies to two decimals."""
    width = max(map(len, row))
    return "\n".join(f"{key:<{width}}  {value:.2f}" if isinstance(value, float) else f"{key:<{width}}  {value}"
                     for key, value in row.items())  # fmt: skip


if __name__ == "__main__":
    sys.exit(run_cli(main))
