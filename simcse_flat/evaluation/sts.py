"""STS evaluation: SentEval's STS12-16, STS-B and SICK-R, cosine Spearman × 100.

Data comes from a SentEval-layout folder (:func:`load_senteval_task`) or from MTEB's copies on the hub
(:func:`load_hub_task`). :func:`evaluate_sts` takes any ``encode(list[str]) -> (n, D)`` callable, encodes every
distinct sentence of all requested tasks once, scores each pair by the cosine of its two embeddings and reports the
Spearman correlation with the gold scores, × 100.

Aggregations (SentEval's, as SimCSE reports them):

===========  ==================================================================================================
``all``      STS12-16: one Spearman over the concatenation of the task's sub-sets (SimCSE's headline figure)
``wmean``    STS12-16: the sub-sets' Spearmans averaged, weighted by sub-set size (SentEval's ``wmean``)
``avg``      the mean over the requested tasks of each task's headline: ``all`` for STS12-16, the single
             Spearman for STS-B and SICK-R
===========  ==================================================================================================

Layout of ``data_dir`` (SentEval's ``data/downstream``, which is also accepted as the parent of ``downstream/``)::

    STS/STS12-en-test/STS.input.MSRpar.txt, STS.gs.MSRpar.txt, ...  one TAB per input line; blank gold = unscored
    STS/STSBenchmark/sts-{train,dev,test}.csv                        TAB-separated despite the name, 7 fields
    SICK/SICK_{train,trial,test_annotated}.txt                       header row, 5 fields (trial is the dev split)

Sentences are whitespace-normalised (``" ".join(s.split())``), as SentEval's split-then-join does. Every file is
read as UTF-8, split on LF only, with a trailing CR dropped (SICK's test file has CRLF line ends). Nothing is read
with CSV quoting: STS-B has bare ``"`` characters that a CSV reader silently merges rows over.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import Tensor

from ..data.text import read_utf8_lines
from ..errors import DataError

TASK_NAMES = ("sts12", "sts13", "sts14", "sts15", "sts16", "stsb", "sickr")

# SentEval's explicit sub-set lists. STS13's SMT is LDC-licensed: its gold file ships without an input file, so it
# is left out, as SentEval does. Never glob STS.gs.*.txt (STS12 also has STS.gs.ALL.txt, with no input file).
SENTEVAL_SUBSETS = {
    "sts12": ("STS12-en-test", ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews")),
    "sts13": ("STS13-en-test", ("FNWN", "headlines", "OnWN")),
    "sts14": ("STS14-en-test", ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news")),
    "sts15": ("STS15-en-test", ("answers-forums", "answers-students", "belief", "headlines", "images")),
    "sts16": ("STS16-en-test", ("answer-answer", "headlines", "plagiarism", "postediting", "question-question")),
}

# MTEB's hub copies: columns sentence1, sentence2, score; our split name -> the hub's split name
HUB_DATASETS = {
    **{name: (f"mteb/{name}-sts", {"test": "test"}) for name in SENTEVAL_SUBSETS},
    "stsb": ("mteb/stsbenchmark-sts", {"train": "train", "dev": "validation", "test": "test"}),
    "sickr": ("mteb/sickr-sts", {"test": "test"}),
}

MIN_SCORE, MAX_SCORE = 0.0, 5.0  # STS gold scores are in [0, 5], SICK relatedness in [1, 5]


@dataclass(frozen=True)
class _PairFileFormat:
    """A one-file-per-split TAB-separated layout (STS-B, SICK): where each split is, which fields hold what."""

    files: dict[str, str]  # split -> path under data_dir
    n_fields: int
    sentence_fields: tuple[int, int]
    score_field: int
    header: str | None = None  # the exact first line, for files that have one


PAIR_FILES = {
    "stsb": _PairFileFormat(  # fields: genre, source file, year, id, score, sentence1, sentence2
        files={split: f"STS/STSBenchmark/sts-{split}.csv" for split in ("train", "dev", "test")},
        n_fields=7,
        sentence_fields=(5, 6),
        score_field=4,
    ),
    "sickr": _PairFileFormat(
        files={"train": "SICK/SICK_train.txt", "dev": "SICK/SICK_trial.txt", "test": "SICK/SICK_test_annotated.txt"},
        n_fields=5,
        sentence_fields=(1, 2),
        score_field=3,
        header="pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment",
    ),
}

Encode = Callable[..., "np.ndarray | Tensor"]  # list[str] (and optionally batch_size=) -> (n, D)


class StsDataError(DataError):
    """Missing or malformed STS data; the message names the file (and 1-based line) or hub dataset."""


class StsPair(NamedTuple):
    sentence1: str
    sentence2: str
    score: float


@dataclass
class StsTask:
    """One STS task: its sub-sets of scored pairs, in file order.

    Args:
        name: the task's name, the prefix of its result keys (``sts12``, ``stsb``, ...).
        subsets: sub-set name -> scored pairs (SentEval's data sets for STS12-16; the split for STS-B and SICK-R).
        aggregated: report SentEval's ``all`` and ``wmean`` aggregations (STS12-16) instead of one Spearman.
        source: where the pairs came from: a folder, a file or a hub id.
    """

    name: str
    subsets: dict[str, list[StsPair]]
    aggregated: bool = False
    source: str = ""

    @property
    def pairs(self) -> list[StsPair]:
        return [pair for pairs in self.subsets.values() for pair in pairs]


# --------------------------------------------------------------------------------------------------- loading


def load_sts_tasks(
    tasks: Sequence[str | StsTask] = TASK_NAMES, data_dir: str | Path | None = None, split: str = "test"
) -> list[StsTask]:
    """Tasks by name (from ``data_dir`` if given, else from the hub); :class:`StsTask` objects pass through."""
    if not tasks:
        raise StsDataError(f"no STS tasks requested; choose from {list(TASK_NAMES)}")
    loaded = [
        task if isinstance(task, StsTask)
        else load_hub_task(task, split) if data_dir is None
        else load_senteval_task(task, data_dir, split)
        for task in tasks
    ]  # fmt: skip
    names = [task.name for task in loaded]
    if len(set(names)) != len(names):
        raise StsDataError(f"each STS task may be requested once; got {names}")
    return loaded


def load_senteval_task(name: str, data_dir: str | Path, split: str = "test") -> StsTask:
    """Read one task from a SentEval-layout folder (see the module docstring), checking every line."""
    _check_task_and_split(name, split)
    root = _senteval_root(Path(data_dir))
    if name in SENTEVAL_SUBSETS:
        folder_name, subset_names = SENTEVAL_SUBSETS[name]
        folder = root / "STS" / folder_name
        if not folder.is_dir():
            raise StsDataError(f"{name}: task folder not found: {folder}")
        subsets = {subset: _read_senteval_subset(folder, subset) for subset in subset_names}
        return StsTask(name, subsets, aggregated=True, source=str(folder))
    layout = PAIR_FILES[name]
    path = root / layout.files[split]
    return StsTask(name, {split: _read_pair_file(path, layout)}, source=str(path))


def load_hub_task(name: str, split: str = "test") -> StsTask:
    """Read one task from MTEB's hub copy (``mteb/sts12-sts`` ... ``mteb/sickr-sts``) with ``datasets``.

    The hub copies carry no sub-set labels, so STS12-16 come as one sub-set: their ``wmean`` equals ``all``. MTEB's
    SICK-R test split is all of SICK (9,927 pairs, as MTEB scores it), not SentEval's 4,927-pair test file.
    """
    _check_task_and_split(name, split)
    dataset_id, hub_splits = HUB_DATASETS[name]
    if split not in hub_splits:
        raise StsDataError(f"{dataset_id} has no {split!r} split (it has {list(hub_splits)}); for {name} {split}, "
                           "pass a SentEval folder as data_dir")  # fmt: skip
    import datasets  # imported here so that only the hub path pays for it
    from huggingface_hub import constants

    offline = "is offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else None
    if offline is None and not _hub_reachable():  # else five retries and a minute of warnings, then the same error
        offline = f"cannot be reached ({constants.ENDPOINT})"
    try:
        with _hub_offline() if offline else contextlib.nullcontext():  # offline: the datasets cache alone
            rows = datasets.load_dataset(dataset_id, split=hub_splits[split])
    except (OSError, ValueError) as err:  # offline (ConnectionError), not found, unknown split
        where = (f"not in the datasets cache, and the hub {offline}" if offline
                 else f"cannot load it from the hub ({str(err).strip().splitlines()[0] if str(err).strip() else err})")
        raise StsDataError(f"{name} {split}: {dataset_id} (split {hub_splits[split]!r}): {where}. "
                           f"{senteval_hint(name, split)}") from err  # fmt: skip
    missing = {"sentence1", "sentence2", "score"} - set(rows.column_names)
    if missing:
        raise StsDataError(f"{dataset_id}: missing columns {sorted(missing)} (it has {rows.column_names})")
    columns = rows.select_columns(["sentence1", "sentence2", "score"]).to_dict()
    pairs = []
    rows_of_columns = zip(columns["sentence1"], columns["sentence2"], columns["score"])
    for row, (sentence1, sentence2, score) in enumerate(rows_of_columns):
        where = f"{dataset_id} ({split}) row {row}"
        pairs.append(_make_pair(sentence1, sentence2, _parse_score(score, where), where))
    if not pairs:
        raise StsDataError(f"{dataset_id} ({split}) has no rows")
    return StsTask(name, {split: pairs}, aggregated=name in SENTEVAL_SUBSETS, source=dataset_id)


def senteval_hint(name: str, split: str) -> str:
    """What to pass instead of the hub: the flag, and the files of ``name`` it must hold."""
    if name in SENTEVAL_SUBSETS:
        files = f"STS/{SENTEVAL_SUBSETS[name][0]}/STS.input.*.txt and STS.gs.*.txt"
    else:
        files = PAIR_FILES[name].files[split]
    shipped = " (this repository ships it: --data_dir data/senteval)" if (name, split) == ("stsb", "dev") else ""
    return (f"Pass --data_dir DIR (data_dir= from Python): a SentEval-layout folder (SentEval's data/downstream) "
            f"holding DIR/{files}{shipped}")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's host (through a proxy, if one is set, the answer is assumed yes)."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(key) for key in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def _hub_offline():
    """``datasets`` and ``huggingface_hub`` as under ``HF_HUB_OFFLINE=1``, for one load: the cache or an error."""
    import datasets
    from huggingface_hub import constants

    kept = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = kept


def _check_task_and_split(name: str, split: str) -> None:
    if name not in TASK_NAMES:
        raise StsDataError(f"unknown STS task {name!r}; choose from {list(TASK_NAMES)}")
    if name in SENTEVAL_SUBSETS and split != "test":
        raise StsDataError(f"{name} has only a 'test' split (SimCSE selects checkpoints on stsb dev)")
    if name in PAIR_FILES and split not in PAIR_FILES[name].files:
        raise StsDataError(f"{name} has no {split!r} split; choose from {list(PAIR_FILES[name].files)}")


def _senteval_root(data_dir: Path) -> Path:
    """``data_dir`` itself, or ``data_dir/downstream`` when given SentEval's ``data/`` folder."""
    if not data_dir.is_dir():
        raise StsDataError(f"STS data folder not found: {data_dir}")
    downstream = data_dir / "downstream"
    return downstream if downstream.is_dir() and not (data_dir / "STS").is_dir() else data_dir


def _read_senteval_subset(folder: Path, subset: str) -> list[StsPair]:
    """``STS.input.<subset>.txt`` (``s1<TAB>s2``) aligned line by line with ``STS.gs.<subset>.txt``.

    A blank gold line means the pair was never scored (most of STS15/16): it is skipped with its input line.
    """
    input_path, gold_path = folder / f"STS.input.{subset}.txt", folder / f"STS.gs.{subset}.txt"
    inputs, golds = _read_lines(input_path), _read_lines(gold_path)
    if len(inputs) != len(golds):
        raise StsDataError(f"{input_path} has {len(inputs)} lines but {gold_path} has {len(golds)}; "
                           "they must align line by line")  # fmt: skip
    pairs = []
    for number, (line, gold) in enumerate(zip(inputs, golds), start=1):
        sentence1, sentence2 = _split_fields(line, 2, f"{input_path}:{number}")
        if gold.strip():
            score = _parse_score(gold, f"{gold_path}:{number}")
            pairs.append(_make_pair(sentence1, sentence2, score, f"{input_path}:{number}"))
    if not pairs:
        raise StsDataError(f"{gold_path}: no scored pairs (every gold line is blank)")
    return pairs


def _read_pair_file(path: Path, layout: _PairFileFormat) -> list[StsPair]:
    """One pair a line, ``layout.n_fields`` TAB-separated fields, after the header if the layout has one."""
    lines = _read_lines(path)
    n_header_lines = 0 if layout.header is None else 1
    if n_header_lines and lines[0] != layout.header:
        raise StsDataError(f"{path}:1: expected the header {layout.header!r}, found {lines[0][:80]!r}")
    index1, index2 = layout.sentence_fields
    pairs = []
    for number, line in enumerate(lines[n_header_lines:], start=n_header_lines + 1):
        where = f"{path}:{number}"
        fields = _split_fields(line, layout.n_fields, where)
        score = _parse_score(fields[layout.score_field], where)
        pairs.append(_make_pair(fields[index1], fields[index2], score, where))
    if not pairs:
        raise StsDataError(f"{path}: no pairs after the header")
    return pairs


def _read_lines(path: Path) -> list[str]:
    return read_utf8_lines(path, StsDataError, kind="STS data file")


def _split_fields(line: str, n_fields: int, where: str) -> list[str]:
    fields = line.split("\t")
    if len(fields) != n_fields:
        raise StsDataError(f"{where}: expected {n_fields} TAB-separated fields, found {len(fields)}")
    return fields


def _parse_score(value: str | float, where: str) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise StsDataError(f"{where}: gold score {value!r} is not a number") from None
    if not math.isfinite(score):
        raise StsDataError(f"{where}: gold score {value!r} is not a finite number")
    if not MIN_SCORE <= score <= MAX_SCORE:
        raise StsDataError(f"{where}: gold score {value!r} is outside [{MIN_SCORE:g}, {MAX_SCORE:g}]")
    return score


def _make_pair(sentence1: str, sentence2: str, score: float, where: str) -> StsPair:
    """A pair with whitespace-normalised sentences (SentEval splits on whitespace and joins with one space)."""
    sentences = [" ".join(str(sentence).split()) for sentence in (sentence1, sentence2)]
    for position, sentence in enumerate(sentences, start=1):
        if not sentence:
            raise StsDataError(f"{where}: sentence {position} is empty")
    return StsPair(sentences[0], sentences[1], score)


# ------------------------------------------------------------------------------------------------ evaluation


@torch.inference_mode()
def evaluate_sts(
    encode: Encode,
    tasks: Sequence[str | StsTask] = TASK_NAMES,
    data_dir: str | Path | None = None,
    split: str = "test",
    batch_size: int | None = None,
) -> dict[str, float | int | str]:
    """Cosine Spearman × 100 of ``encode`` on STS tasks, as a flat name-prefixed dict.

    Args:
        encode: ``list[str] -> (n, D)`` array or tensor, one row per sentence in input order, e.g.
            ``SentenceEncoder.encode`` or ``SentenceTransformer.encode``. It is called once, with every distinct
            sentence of all tasks: a sentence shared by two pairs or two tasks is encoded once.
        tasks: task names (see :data:`TASK_NAMES`) or loaded :class:`StsTask` objects.
        data_dir: a SentEval-layout folder for tasks given by name; ``None`` reads MTEB's hub copies.
        split: ``test``; STS-B and SICK-R also have ``dev`` (SimCSE selects checkpoints on STS-B dev) and ``train``.
        batch_size: passed on to ``encode`` as ``batch_size=`` when given.

    Returns:
        ``{task}_all_spearman``, ``{task}_wmean_spearman`` and ``{task}_{subset}_spearman`` for STS12-16
        (sub-sets only where known), ``{task}_spearman`` for STS-B and SICK-R, ``{task}_n_pairs``, the mean of the
        tasks' headlines as ``avg_spearman``, and ``primary_metric``, the key of the headline: the task's own
        figure for one task, ``avg_spearman`` for several.
    """
    loaded = load_sts_tasks(tasks, data_dir, split)
    sentences = unique_sentences(loaded)
    embeddings = _unit_embeddings(encode, sentences, batch_size)
    row_of = {sentence: row for row, sentence in enumerate(sentences)}
    results: dict[str, float | int | str] = {}
    for task in loaded:
        cosines = {subset: _pair_cosines(embeddings, row_of, pairs) for subset, pairs in task.subsets.items()}
        results.update(score_task(task, cosines))
    headlines = [results[headline_key(task)] for task in loaded]
    results["avg_spearman"] = float(np.mean(headlines))
    results["primary_metric"] = headline_key(loaded[0]) if len(loaded) == 1 else "avg_spearman"
    return results


def unique_sentences(tasks: Sequence[StsTask]) -> list[str]:
    """Every distinct sentence of ``tasks``, in order of first appearance."""
    return list(dict.fromkeys(sentence for task in tasks for pair in task.pairs for sentence in pair[:2]))


def score_task(task: StsTask, cosines: dict[str, np.ndarray]) -> dict[str, float | int]:
    """The task's figures from each sub-set's predicted similarities (aligned with ``task.subsets``' pairs)."""
    gold = {subset: np.array([pair.score for pair in pairs]) for subset, pairs in task.subsets.items()}
    pooled = spearman_x100(np.concatenate(list(gold.values())), np.concatenate([cosines[s] for s in gold]))
    results: dict[str, float | int] = {f"{task.name}_n_pairs": len(task.pairs)}
    if not task.aggregated:
        return {f"{task.name}_spearman": pooled, **results}
    per_subset = {subset: spearman_x100(gold[subset], cosines[subset]) for subset in gold}
    sizes = [len(gold[subset]) for subset in gold]
    results[f"{task.name}_all_spearman"] = pooled
    results[f"{task.name}_wmean_spearman"] = float(np.average(list(per_subset.values()), weights=sizes))
    if len(per_subset) > 1:  # a hub copy has one unnamed sub-set: nothing to add
        results.update({f"{task.name}_{subset}_spearman": value for subset, value in per_subset.items()})
    return results


def headline_key(task: StsTask) -> str:
    """The result key of a task's headline figure: ``all`` for STS12-16 (as SimCSE), else its one Spearman."""
    return f"{task.name}_all_spearman" if task.aggregated else f"{task.name}_spearman"


def spearman_x100(gold: np.ndarray, predicted: np.ndarray) -> float:
    """Spearman's rank correlation × 100; tied values share their mean rank (as SentEval and sentence-transformers)."""
    return float(spearmanr(gold, predicted).statistic * 100)


def _unit_embeddings(encode: Encode, sentences: list[str], batch_size: int | None) -> Tensor:
    """``encode(sentences)`` as an fp32 CPU tensor ``(n, D)`` with unit rows, so a dot product is a cosine."""
    output = encode(sentences) if batch_size is None else encode(sentences, batch_size=batch_size)
    embeddings = torch.as_tensor(output).float().cpu()
    if embeddings.ndim != 2 or len(embeddings) != len(sentences):
        raise ValueError(f"encode returned shape {tuple(embeddings.shape)} for {len(sentences)} sentences; "
                         f"expected ({len(sentences)}, D)")  # fmt: skip
    return torch.nn.functional.normalize(embeddings, dim=-1)


def _pair_cosines(embeddings: Tensor, row_of: dict[str, int], pairs: list[StsPair]) -> np.ndarray:
    rows1 = torch.tensor([row_of[pair.sentence1] for pair in pairs])
    rows2 = torch.tensor([row_of[pair.sentence2] for pair in pairs])
    return (embeddings[rows1] * embeddings[rows2]).sum(-1).double().numpy()  # (n_pairs,)


def format_sts_table(results: dict[str, float | int | str]) -> str:
    """One row per task in ``results`` (from :func:`evaluate_sts`) and the average, saying what each column is."""
    names = [key.removesuffix("_n_pairs") for key in results if key.endswith("_n_pairs")]
    aggregated = [name for name in names if f"{name}_all_spearman" in results]
    rows = [f"{'task':8s} {'pairs':>6s} {'spearman':>9s}" + (f" {'wmean':>7s}" if aggregated else "")]
    for name in names:
        headline = results.get(f"{name}_all_spearman", results.get(f"{name}_spearman"))
        wmean = f" {results[f'{name}_wmean_spearman']:7.2f}" if name in aggregated else ""
        rows.append(f"{name:8s} {results[f'{name}_n_pairs']:6d} {headline:9.2f}{wmean}")
    rows.append(f"{'avg':8s} {'':6s} {results['avg_spearman']:9.2f}")
    rows.append("spearman: cosine Spearman x 100" + (
        f"; for {', '.join(aggregated)} SentEval's 'all' aggregation (one Spearman over the pooled sub-sets, "
        "SimCSE's figure); wmean: the sub-sets' Spearmans weighted by size" if aggregated else ""
    ))  # fmt: skip
    return "\n".join(rows)
