"""Training state on disk without pickle: tensors in safetensors, everything around them in JSON.

A checkpoint is a file people download and share, and unpickling one runs whatever code it names. So nothing
here pickles: :func:`save_tree` walks a state (the nested dicts, lists and tuples of ``optimizer.state_dict()``,
``scheduler.state_dict()``, the RNG states, a loss's ``state_dict()``), writes each tensor (and numpy array) into
``NAME.safetensors`` and the structure, with a placeholder where each tensor was, into ``NAME.json``.
:func:`load_tree` rebuilds it. Loading reads JSON and raw tensor bytes only: a hostile file can make loading fail,
never run code.

Types that survive the round trip: dict (any JSON-scalar keys, order kept), list, tuple, str, int, float (inf and
nan included), bool, None, ``torch.Tensor``, ``numpy.ndarray``. Anything else is refused when saving, so a state
that cannot be restored exactly is never written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

_TAG = "__simcse_flat__"  # marks a JSON object that stands for something JSON has no type for


def save_tree(state: Any, stem: str | Path) -> list[Path]:
    """Write ``state`` as ``STEM.json`` + ``STEM.safetensors``; return the two paths."""
    stem = Path(stem)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(state, tensors)
    json_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    json_path.write_text(json.dumps(skeleton, allow_nan=True))
    save_file(tensors, str(tensor_path))
    return [json_path, tensor_path]


def load_tree(stem: str | Path, device: str | torch.device = "cpu") -> Any:
    """The state :func:`save_tree` wrote at ``stem``; tensors on ``device``. Raises ``ValueError`` naming the
    file on a malformed one."""
    stem = Path(stem)
    json_path, tensor_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    try:
        skeleton = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{json_path}: cannot read it ({err})") from None
    try:
        tensors = load_file(str(tensor_path), device=str(device))
    except Exception as err:  # safetensors raises its own error types for truncated or garbled files
        raise ValueError(f"{tensor_path}: cannot read it ({err})") from None
    try:
        return _decode(skeleton, tensors)
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{json_path}: does not match {tensor_path.name} ({err})") from None


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()  # a copy: no two entries share storage
        return {_TAG: "tensor", "key": key}
    if isinstance(value, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value))
        return {_TAG: "ndarray", "key": key}
    if isinstance(value, np.generic):  # a numpy scalar: its Python value
        return _encode(value.item(), tensors)
    if isinstance(value, (list, tuple)):
        items = [_encode(v, tensors) for v in value]
        return items if isinstance(value, list) else {_TAG: "tuple", "items": items}
    if isinstance(value, dict):
        # JSON keys are strings; optimizer states are keyed by int, so keys are kept as a list of pairs
        if not all(k is None or isinstance(k, (bool, int, float, str)) for k in value):
            raise TypeError(f"cannot save a dict key of type {type(next(iter(value))).__name__}")
        return {_TAG: "dict", "items": [[k, _encode(v, tensors)] for k, v in value.items()]}
    raise TypeError(f"cannot save a {type(value).__name__} without pickle")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    kind = value.get(_TAG)
    if kind == "tensor":
        return tensors[value["key"]]
    if kind == "ndarray":
        return tensors[value["key"]].numpy()
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in value["items"])
    if kind == "dict":
        return {k: _decode(v, tensors) for k, v in value["items"]}
    raise ValueError(f"unknown entry {value!r:.80}")
