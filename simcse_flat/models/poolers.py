"""The poolers a plain Hugging Face encoder can get, by name: what the settings check reads without loading
sentence-transformers (which imports torchvision where it is installed)."""

from __future__ import annotations

import difflib

POOLERS = ("cls", "cls_before_pooler", "mean", "avg_first_last", "lasttoken")
_POOLER_ALIASES = {"avg": "mean", "last": "lasttoken"}


def resolve_pooler(name: str) -> str:
    """``name``, or the pooler it is SimCSE's alias of (``avg``: ``mean``); ``ValueError`` naming the closest."""
    name = _POOLER_ALIASES.get(name, name)
    if name not in POOLERS:
        close = difflib.get_close_matches(name, POOLERS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown pooler {name!r}; choose one of {list(POOLERS)}.{hint}")
    return name
