"""Train a sentence encoder: ``accelerate launch train.py --config configs/quickstart.yaml [--key value ...]``.

The same command is installed as ``simcse-flat-train``; it lives in :mod:`simcse_flat.commands`.
"""

import sys

from simcse_flat.commands import train_command

if __name__ == "__main__":
    sys.exit(train_command())
