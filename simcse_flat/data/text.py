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

import bisect
import csv
import hashlib
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:  # imported where a corpus is read: the vision path and the STS readers need no datasets
    from datasets import Dataset

SUP_COLUMNS = ("sent0", "sent1", "hard_neg")


from ..errors import DataError  # noqa: E402 - the core's errors (simcse_flat.errors)
from ..samples import HARD_NEGATIVE  # noqa: E402


def read_utf8_lines(path: Path, error: type[DataError] = DataError, kind: str = "training file") -> list[str]:
    """The lines of a UTF-8 file, split on LF only (never on other Unicode breaks), without a trailing CR or a BOM.

    A missing or empty file, or a line that is not UTF-8, raises ``error`` naming the file (and the line, the byte
    and its column). Shared by the training data and the STS readers.
    """
    return [line for _, line in iter_utf8_lines(path, error, kind)]


def iter_utf8_lines(
    path: Path, error: type[DataError] = DataError, kind: str = "training file"
) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of :func:`read_utf8_lines`, read as a stream: a corpus larger than memory is fine."""
    _check_not_empty(path, error, kind)
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):  # binary iteration splits on b"\n" only
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            raw = raw.removesuffix(b"\n").removesuffix(b"\r")
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                byte = f"byte {raw[err.start]:#04x} at column {err.start + 1}"
                raise error(f"{path}:{number}: not valid UTF-8 ({byte})") from None


def _check_not_empty(path: Path, error: type[DataError], kind: str) -> None:
    if not path.is_file():
        raise error(f"{kind} not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(1 << 16).removeprefix(b"\xef\xbb\xbf")
        while head and not head.strip():  # whitespace so far: read on, in blocks, until something shows
            head = handle.read(1 << 16)
    if not head.strip():
        raise error(f"{path}: the file is empty")


def content_key(text: str) -> int:
    """A 64-bit key of the text, the same for the same words whatever the spacing or Unicode composition: two samples
    with one key are duplicates, which must never serve as each other's negatives."""
    normal = " ".join(unicodedata.normalize("NFC", text).split())
    return int.from_bytes(hashlib.blake2b(normal.encode("utf-8"), digest_size=8).digest(), "little", signed=True)


def read_sentences(path: str | Path) -> tuple[list[str], int]:
    """One sentence a line, and how many blank lines were skipped (paragraph breaks are common in corpora; an empty
    sentence is no training example). In memory: for small files; training reads through :func:`load_train_source`."""
    lines = [line for _, line in iter_utf8_lines(Path(path))]
    sentences = [line for line in lines if line.strip()]
    return sentences, len(lines) - len(sentences)


def read_triples(path: str | Path) -> dict[str, list[str]]:
    """A csv with header ``sent0,sent1`` or ``sent0,sent1,hard_neg``; every field non-empty. In memory, as above."""
    rows = list(_triple_rows(str(path)))
    return {column: [row[column] for row in rows] for column in rows[0] if column != "key"}


def _sentence_rows(path: str, **cache_key) -> Iterator[dict]:
    """The rows of a sentence file, streamed: ``text`` and its ``key``; blank lines skipped."""
    for _, line in iter_utf8_lines(Path(path)):
        if line.strip():
            yield {"text": line, "key": content_key(line)}


def _triple_rows(path: str, **cache_key) -> Iterator[dict]:
    """The rows of a triples csv, streamed, keyed by the premise (rows sharing one are duplicates as anchors).

    Errors name the line where the row *starts*: a quote left open swallows the lines after it, and the line the
    reader stopped on would point past the mistake.
    """
    path = Path(path)
    reader = csv.reader(line + "\n" for _, line in iter_utf8_lines(path))
    header = next(reader)
    columns = [h.strip() for h in header]
    if columns not in (list(SUP_COLUMNS[:2]), list(SUP_COLUMNS)):
        raise DataError(f"{path}:1: header must be 'sent0,sent1' or 'sent0,sent1,hard_neg', got {','.join(header)!r}")
    any_row = False
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
            hint = f" (the row runs on to line {reader.line_num}: a quote opened here is never closed?)" * (spans > 0)
            expected = f"{len(columns)} fields ({','.join(columns)})"
            raise DataError(f"{path}:{start}: expected {expected}, got {len(row)}{hint}")
        for column, value in zip(columns, row):
            if not value.strip():
                raise DataError(f"{path}:{start}: empty {column}")
        any_row = True
        yield {**dict(zip(columns, row)), "key": content_key(row[0])}
    if not any_row:
        raise DataError(f"{path}: no rows after the header")


@dataclass
class TrainSource:
    """One training corpus: where from, its rows (``text`` or ``sent0, sent1[, hard_neg]``, plus ``key``), and what
    the run's opening line should say about it (blank lines skipped, duplicates)."""

    name: str
    dataset: Dataset
    notes: list[str]

    @property
    def supervised(self) -> bool:
        return "sent0" in self.dataset.column_names


def load_train_source(
    train_file: str, split: str = "train", max_samples: int | None = None, dedupe: bool = False,
    cache_dir: str | None = None,
) -> TrainSource:  # fmt: skip
    """A ``.txt``, a ``.csv`` or a hub dataset as a :class:`TrainSource`.

    Local files are checked line by line as they are streamed into an Arrow file in the ``datasets`` cache (memory-
    mapped, so memory does not grow with the corpus; rebuilt only when the file changes). ``dedupe`` keeps the first
    of each group of rows with one ``key``; otherwise duplicates are counted and kept.
    """
    path = Path(train_file)
    if path.suffix in (".txt", ".csv"):
        rows = _sentence_rows if path.suffix == ".txt" else _triple_rows
        dataset = _arrow_dataset(rows, path, cache_dir)
    elif path.exists() or path.suffix:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .txt (unsupervised) or .csv (supervised)")
    else:
        dataset = _load_hub_dataset(train_file, split)
    stats = _source_stats(dataset, path if path.suffix == ".txt" else None)
    notes = []
    if stats["blank_lines"]:
        notes.append(f"{stats['blank_lines']} blank line{'s' * (stats['blank_lines'] > 1)} skipped")
    if dedupe and stats["duplicates"]:
        dataset = dataset.select(first_of_each_key(dataset))
        notes.append(f"{stats['duplicates']} duplicates dropped (dedupe)")
    elif stats["duplicates"]:
        notes.append(f"{stats['duplicates']} duplicates")
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return TrainSource(train_file, dataset, notes)


def _arrow_dataset(rows, path: Path, cache_dir: str | None) -> Dataset:
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError

    _check_not_empty(path, DataError, "training file")
    stat = path.stat()  # in the cache key: a changed file is read again
    cache_key = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        # large record batches: opening the file walks them all, and with datasets' 1,000 rows a batch that walk
        # made a 10M-line corpus resident (RSS +580 MB); with 100,000 it touches a few pages (bench_memory.py)
        dataset = Dataset.from_generator(rows, gen_kwargs=cache_key, cache_dir=cache_dir, writer_batch_size=100_000)
    except DatasetGenerationError as err:
        if isinstance(err.__cause__, DataError):
            raise err.__cause__ from None
        raise
    if len(dataset) == 0:
        raise DataError(f"{path}: only blank lines")
    return dataset


def _source_stats(dataset: Dataset, text_file: Path | None) -> dict[str, int]:
    """Blank lines skipped and duplicate rows (rows whose key an earlier row has): read once, then kept beside the
    Arrow cache file, so a run on a cached 10M-line corpus starts without reading the corpus again."""
    sidecar = None
    if dataset.cache_files:  # one per Arrow file: a cache folder can hold several (splits, map results)
        arrow = Path(dataset.cache_files[-1]["filename"])
        sidecar = arrow.with_name(arrow.name + ".simcse_flat_stats.json")
    if sidecar is not None and sidecar.exists():
        return json.loads(sidecar.read_text())
    keys = _keys(dataset)
    keys.sort()
    duplicates = int((keys[1:] == keys[:-1]).sum()) if len(keys) > 1 else 0
    lines = _count_lines(text_file) if text_file is not None else len(dataset)
    stats = {"rows": len(dataset), "blank_lines": lines - len(dataset), "duplicates": duplicates}
    if sidecar is not None:
        sidecar.write_text(json.dumps(stats))
    return stats


def first_of_each_key(dataset: Dataset) -> list[int]:
    """Row indices keeping the first row of each key, in order."""
    _, first = np.unique(_keys(dataset), return_index=True)
    return np.sort(first).tolist()


def _keys(dataset: Dataset) -> np.ndarray:
    """The ``key`` column as one int64 array, read chunk by chunk from Arrow (not through Python objects)."""
    column = dataset.data.column("key")
    return np.concatenate([chunk.to_numpy(zero_copy_only=False) for chunk in column.chunks]) if column.num_chunks \
        else np.empty(0, dtype=np.int64)


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


def _load_hub_dataset(name: str, split: str) -> Dataset:
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError)
        raise DataError(f"cannot load training data {name!r} (not a local file, and the hub said: {err})") from err
    columns = set(dataset.column_names)
    if "text" in columns:
        return _with_keys(dataset.select_columns(["text"]), "text")
    if {"sent0", "sent1"} <= columns:
        return _with_keys(dataset.select_columns([c for c in SUP_COLUMNS if c in columns]), "sent0")
    wanted = "a 'text' column or 'sent0','sent1'[,'hard_neg']"
    raise DataError(f"hub dataset {name!r} needs {wanted}, has {sorted(columns)}")


def _with_keys(dataset: Dataset, column: str) -> Dataset:
    return dataset.map(lambda batch: {"key": [content_key(t) for t in batch[column]]}, batched=True, desc="keys")


@dataclass
class ContrastiveCollator:
    """Tokenizes a list of examples into one batch holding every view, view-major.

    Rows ``[v*B:(v+1)*B]`` are view ``v`` of the ``B`` examples: unsupervised, view 1 repeats view 0 (dropout is the
    only noise, SimCSE); supervised, the views are ``sent0, sent1[, hard_neg]``. One forward pass encodes them all.
    ``sample_ids`` carries the data-set index of each example, for losses with per-sample state; ``sample_keys``
    its content key (:func:`content_key`), so that duplicates are not used as each other's negatives. A model with a
    default prompt trains on prompted text, as it is evaluated and used (:meth:`SentenceEncoder.training_prompt`).
    """

    tokenizer: object
    max_length: int = 32
    prompt: str = ""  # the model's default prompt ("query: "), put before every sentence as its encode() does

    def __call__(self, examples: list[dict]) -> dict[str, Tensor]:
        ids = torch.tensor([e["idx"] for e in examples], dtype=torch.long)
        if "text" in examples[0]:
            batch = self._tokenize([e["text"] for e in examples])
            batch = {k: torch.cat([v, v]) for k, v in batch.items()}
        else:
            views = [c for c in SUP_COLUMNS if c in examples[0]]
            batch = self._tokenize([e[c] for c in views for e in examples])
        batch["sample_ids"] = ids
        if "key" in examples[0]:  # content keys: a duplicate of an anchor is never its negative (views.py)
            batch["sample_keys"] = torch.tensor([e["key"] for e in examples], dtype=torch.long)
        return batch

    def one_view(self, examples: list[dict], views: list[int]) -> dict[str, Tensor]:
        """View ``views[i]`` of example ``i``, tokenized: the positive (``text``, or ``sent1``), or for
        :data:`~simcse_flat.samples.HARD_NEGATIVE` the ``hard_neg``. What EMC² re-encodes for its chain states; per
        example, since a run with several sources mixes sentences and triples among them."""
        return self._tokenize([e["hard_neg"] if view == HARD_NEGATIVE else e.get("text", e.get("sent1"))
                               for e, view in zip(examples, views)])  # fmt: skip

    def _tokenize(self, sentences: list[str]) -> dict[str, Tensor]:
        return dict(
            self.tokenizer([self.prompt + sentence for sentence in sentences], padding=True, truncation=True,
                           max_length=self.max_length, return_tensors="pt")  # fmt: skip
        )


class SourcesDataset(torch.utils.data.Dataset):
    """Several training sources as one index space: source ``s`` owns sample ids ``offset_s .. offset_s + n_s - 1``,
    so per-sample state (EMC²'s chains, SogCLR's u) covers every source. Each item carries its id as ``idx``."""

    def __init__(self, sources: list[TrainSource]) -> None:
        self.sources = sources
        self.sizes = [len(source.dataset) for source in sources]
        self.offsets = np.cumsum([0, *self.sizes]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict:
        source = bisect.bisect_right(self.offsets, index) - 1
        return {**self.sources[source].dataset[index - self.offsets[source]], "idx": index}
