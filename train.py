"""Train a sentence encoder: ``accelerate launch train.py --config configs/quickstart.yaml [--key value ...]``.

Thin on purpose: parse the configuration, hand it to :func:`simcse_flat.trainer.train`, turn user errors into one
clear line. Everything else lives in the library.
"""

from __future__ import annotations

import sys

from accelerate import PartialState

from simcse_flat.cli import run_cli
from simcse_flat.config import parse_config
from simcse_flat.trainer import train_from_config


def main(argv: list[str] | None = None) -> None:
    config = parse_config(argv)
    result = train_from_config(config)
    if PartialState().is_main_process:
        print(f"final model: {result.final_model}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
