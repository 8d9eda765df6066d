"""Evaluation of frozen encoders.

``sts``: SentEval's STS12-16, STS-B and SICK-R, cosine Spearman × 100 (its API is re-exported here).
``linear_probe``: image features -> linear classifier / kNN accuracy (import it from its module).
"""

from .sts import (
    TASK_NAMES,
    StsDataError,
    StsPair,
    StsTask,
    evaluate_sts,
    format_sts_table,
    load_hub_task,
    load_senteval_task,
    load_sts_tasks,
)

__all__ = [
    "TASK_NAMES",
    "StsDataError",
    "StsPair",
    "StsTask",
    "evaluate_sts",
    "format_sts_table",
    "load_hub_task",
    "load_senteval_task",
    "load_sts_tasks",
]
