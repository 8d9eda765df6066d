"""Training text: load, check, and collate into one tokenized batch of all views.

Two layouts, as in SimCSE:

* unsupervised: a ``.txt`` file, one sentence a line. Each sentence becomes two views that differ only by
  dropout, so the collator tokenizes it once and repeats the rows.
* supervised: a ``.csv`` with header ``sent0,sent1[,hard_neg]`` (SimCSE's ``nli_for_simcse.csv``): premise,
  entailment and, optionally, contradiction as a hard negative.

A hub dataset id works too (``text`` column, or ``sent0``/``sent1``/``hard_neg``). Local files are checked line by
line before training starts: an error names the file, the line and what is wrong, instead of failing an hour in.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from torch import Tensor

UNSUP_COLUMNS = ("text",)
SUP_COLUMNS = ("sent0", "sent1", "hard_neg")


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


def read_utf8_lines(path: Path, error: type[DataError] = DataError, kind: str = "training file") -> list[str]:
    """The lines of a UTF-8 file, split on LF only (never on other Unicode breaks), without a trailing CR or a BOM.

    A missing or empty file, or a line that is not UTF-8, raises ``error`` naming the file (and the line, the byte
    and its column). Shared by the training data and the STS readers.
    """
    if not path.is_file():
        raise error(f"{kind} not found: {path}")
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    if not raw.strip():
        raise error(f"{path}: the file is empty")
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last line; it does not start an empty one
    decoded = []
    for number, line in enumerate(lines, start=1):
        try:
            decoded.append(line.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as err:
            raise error(f"{path}:{number}: not valid UTF-8 (byte {line[err.start]:#04x} at column {err.start + 1})") from None
    return decoded


def read_sentences(path: str | Path) -> tuple[list[str], int]:
    """One sentence a line, and how many blank lines were skipped (paragraph breaks are common in corpora; an empty
    sentence is no training example)."""
    lines = read_utf8_lines(Path(path))
    sentences = [line for line in lines if line.strip()]
    return sentences, len(lines) - len(sentences)


def read_triples(path: str | Path) -> dict[str, list[str]]:
    """A csv with header ``sent0,sent1`` or ``sent0,sent1,hard_neg``; every field non-empty.

    Errors name the line where the row *starts*: a quote left open swallows the lines after it, and the line the
    reader stopped on would point past the mistake.
    """
    path = Path(path)
    text = "\n".join(read_utf8_lines(path))
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    columns = [h.strip() for h in header]
    if columns not in (list(SUP_COLUMNS[:2]), list(SUP_COLUMNS)):
        raise DataError(f"{path}:1: header must be 'sent0,sent1' or 'sent0,sent1,hard_neg', got {','.join(header)!r}")
    rows: dict[str, list[str]] = {c: [] for c in columns}
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"{path}:{start}: {err}") from None
        if len(row) != len(columns):
            spans = reader.line_num - start
            hint = f" (the row runs on to line {reader.line_num}: a quote opened here is never closed?)" if spans else ""
            raise DataError(f"{path}:{start}: expected {len(columns)} fields ({','.join(columns)}), got {len(row)}{hint}")
        for column, value in zip(columns, row):
            if not value.strip():
                raise DataError(f"{path}:{start}: empty {column}")
            rows[column].append(value)
    if not rows["sent0"]:
        raise DataError(f"{path}: no rows after the header")
    return rows


def load_train_dataset(train_file: str, split: str = "train", max_samples: int | None = None) -> tuple[Dataset, list[str]]:
    """The training set as a ``datasets.Dataset`` with column ``text`` or ``sent0, sent1[, hard_neg]``, and notes
    for the run's opening line (what was skipped)."""
    path = Path(train_file)
    notes = []
    if path.suffix == ".txt":
        sentences, blank = read_sentences(path)
        if not sentences:
            raise DataError(f"{path}: only blank lines")
        dataset = Dataset.from_dict({"text": sentences})
        if blank:
            notes.append(f"{blank} blank line{'s' if blank > 1 else ''} skipped")
    elif path.suffix == ".csv":
        dataset = Dataset.from_dict(read_triples(path))
    elif path.exists() or path.suffix:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .txt (unsupervised) or .csv (supervised)")
    else:
        dataset = _load_hub_dataset(train_file, split)
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset, notes


def _load_hub_dataset(name: str, split: str) -> Dataset:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError)
        raise DataError(f"cannot load training data {name!r} (not a local file, and the hub said: {err})") from err
    columns = set(dataset.column_names)
    if "text" in columns:
        return dataset.select_columns(["text"])
    if {"sent0", "sent1"} <= columns:
        return dataset.select_columns([c for c in SUP_COLUMNS if c in columns])
    raise DataError(f"hub dataset {name!r} needs a 'text' column or 'sent0','sent1'[,'hard_neg'], has {sorted(columns)}")


def is_supervised(dataset: Dataset) -> bool:
    return "sent0" in dataset.column_names


@dataclass
class ContrastiveCollator:
    """Tokenizes a list of examples into one batch holding every view, view-major.

    Rows ``[v*B:(v+1)*B]`` are view ``v`` of the ``B`` examples: unsupervised, view 1 repeats view 0 (dropout is the
    only noise, SimCSE); supervised, the views are ``sent0, sent1[, hard_neg]``. One forward pass encodes them all.
    ``sample_ids`` carries the data-set index of each example, for losses with per-sample state.
    """

    tokenizer: object
    max_length: int = 32

    def __call__(self, examples: list[dict]) -> dict[str, Tensor]:
        ids = torch.tensor([e["idx"] for e in examples], dtype=torch.long)
        if "text" in examples[0]:
            batch = self._tokenize([e["text"] for e in examples])
            batch = {k: torch.cat([v, v]) for k, v in batch.items()}
        else:
            views = [c for c in SUP_COLUMNS if c in examples[0]]
            batch = self._tokenize([e[c] for c in views for e in examples])
        batch["sample_ids"] = ids
        return batch

    def positives(self, examples: list[dict]) -> dict[str, Tensor]:
        """The positive view alone (``text``, or ``sent1``), tokenized: what EMC² re-encodes for its chains."""
        column = "text" if "text" in examples[0] else "sent1"
        return self._tokenize([e[column] for e in examples])

    def _tokenize(self, sentences: list[str]) -> dict[str, Tensor]:
        return dict(
            self.tokenizer(sentences, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        )


class IndexedDataset(torch.utils.data.Dataset):
    """Wraps a ``datasets.Dataset`` so each example carries its row index as ``idx``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return {**self.dataset[index], "idx": index}
