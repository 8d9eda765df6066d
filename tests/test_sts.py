"""The STS evaluator: SentEval-folder quirks, hand-computed Spearman aggregations, one encode call, the hub path,
parity with sentence-transformers' evaluator on the real data, and the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from simcse_flat.evaluation import (
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

ROOT = Path(__file__).resolve().parents[1]
SICK_HEADER = "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment"
STS13 = "STS/STS13-en-test"


def write_sts_subsets(root: Path, folder: str, subsets: dict[str, list[tuple[str, str, str]]]) -> Path:
    """``STS.input.<subset>.txt`` and ``STS.gs.<subset>.txt`` from ``(sentence1, sentence2, gold)`` rows."""
    path = root / folder
    path.mkdir(parents=True, exist_ok=True)
    for subset, rows in subsets.items():
        (path / f"STS.input.{subset}.txt").write_text("".join(f"{a}\t{b}\n" for a, b, _ in rows), encoding="utf-8")
        (path / f"STS.gs.{subset}.txt").write_text("".join(f"{gold}\n" for *_, gold in rows), encoding="utf-8")
    return path


def write_sts13(root: Path) -> Path:
    """A miniature STS13: three sub-sets, blank gold lines in one, an orphan SMT gold file as in the real data."""
    folder = write_sts_subsets(root, STS13, {
        "FNWN": [("a man is playing a guitar .", "a man plays a guitar .", "4.8"),
                 ("a dog runs .", "a cat sits .", "0.4")],
        "headlines": [("two dogs play", "a woman is eating", ""), ("the red car", "a red car", "4"),
                      ("kids run", "no", ""), ("a man sings", "a woman sings", "1.6")],
        "OnWN": [("a child is riding a horse", "a horse", "2.25"), ("a cat", "the cat", "4.5")],
    })  # fmt: skip
    (folder / "STS.gs.SMT.txt").write_text("3.0\n")  # SentEval skips SMT: its input file is not distributed
    return root


def write_stsb(root: Path, split: str, lines: list[str]) -> Path:
    path = root / "STS" / "STSBenchmark" / f"sts-{split}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_sick(root: Path, name: str, rows: list[str], line_end: str = "\n") -> Path:
    path = root / "SICK" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + line_end for line in [SICK_HEADER, *rows]).encode("utf-8"))
    return path


def stsb_line(score: str, sentence1: str, sentence2: str) -> str:
    return "\t".join(["main-captions", "MSRvid", "2012test", "0001", score, sentence1, sentence2])


# ------------------------------------------------------------------------------------------------ reading


def test_senteval_subsets_skip_blank_gold_lines(tmp_path):
    task = load_senteval_task("sts13", write_sts13(tmp_path))
    assert list(task.subsets) == ["FNWN", "headlines", "OnWN"] and task.aggregated
    assert task.subsets["headlines"] == [
        StsPair("the red car", "a red car", 4.0),
        StsPair("a man sings", "a woman sings", 1.6),
    ]
    assert task.subsets["FNWN"][1] == StsPair("a dog runs .", "a cat sits .", 0.4)
    assert len(task.pairs) == 6  # lines 1 and 3 of headlines are unscored


def test_stsb_reads_tabs_with_bare_quotes_and_no_csv_quoting(tmp_path):
    write_stsb(tmp_path, "test", [
        stsb_line("2.500", '"the man said', 'hello " to all'),  # csv quoting would merge this row with the next
        stsb_line("0", "a  man ,   with spaces", '"quoted"'),
        stsb_line("5.000", "a 'single' quote", "it ' s"),
    ])  # fmt: skip
    task = load_senteval_task("stsb", tmp_path)
    assert task.pairs == [
        StsPair('"the man said', 'hello " to all', 2.5),
        StsPair("a man , with spaces", '"quoted"', 0.0),  # whitespace normalised, as SentEval's split/join
        StsPair("a 'single' quote", "it ' s", 5.0),
    ]
    assert not task.aggregated


def test_sick_reads_crlf_skips_header_and_maps_dev_to_trial(tmp_path):
    write_sick(tmp_path, "SICK_test_annotated.txt", ["1\tA man plays \tA man is playing\t4.5\tENTAILMENT"], "\r\n")
    write_sick(tmp_path, "SICK_trial.txt", ["7\tA dog\tA cat\t1\tNEUTRAL", "8\tTwo kids\tKids\t3.6\tNEUTRAL"])
    assert load_senteval_task("sickr", tmp_path).pairs == [StsPair("A man plays", "A man is playing", 4.5)]
    assert [pair.score for pair in load_senteval_task("sickr", tmp_path, "dev").pairs] == [1.0, 3.6]


@pytest.mark.parametrize(
    ("gold", "problem"),
    [
        ("nan", "not a finite number"),
        ("5.5", r"outside \[0, 5\]"),
        ("-1", r"outside \[0, 5\]"),
        ("four", "not a number"),
    ],
)
def test_bad_gold_score_names_file_and_line(tmp_path, gold, problem):
    write_sts13(tmp_path)
    gold_file = tmp_path / STS13 / "STS.gs.FNWN.txt"
    gold_file.write_text(f"4.8\n{gold}\n")
    with pytest.raises(StsDataError, match=problem) as caught:
        load_senteval_task("sts13", tmp_path)
    assert f"{gold_file}:2:" in str(caught.value)


def test_wrong_number_of_tab_fields_names_file_and_line(tmp_path):
    write_sts13(tmp_path)
    input_file = tmp_path / STS13 / "STS.input.headlines.txt"
    input_file.write_text("two dogs play\ta woman\nthe red car a red car\nkids run\tno\na man\ta woman\n")  # 2: no TAB
    with pytest.raises(StsDataError, match="expected 2 TAB-separated fields, found 1") as caught:
        load_senteval_task("sts13", tmp_path)
    assert f"{input_file}:2:" in str(caught.value)

    stsb_file = write_stsb(tmp_path, "test", [stsb_line("1", "a", "b"), "main-news\tx\t2013\t3.0\tonly six\tfields"])
    with pytest.raises(StsDataError, match=f"{stsb_file}:2: expected 7 TAB-separated fields, found 6"):
        load_senteval_task("stsb", tmp_path)


def test_missing_folder_file_header_and_empty_file_are_clear_errors(tmp_path):
    with pytest.raises(StsDataError, match="STS data folder not found"):
        load_senteval_task("stsb", tmp_path / "absent")
    with pytest.raises(StsDataError, match=f"task folder not found: {tmp_path / 'STS' / 'STS12-en-test'}"):
        load_senteval_task("sts12", tmp_path)
    with pytest.raises(StsDataError, match=f"file not found: {tmp_path / 'STS' / 'STSBenchmark' / 'sts-dev.csv'}"):
        load_senteval_task("stsb", tmp_path, "dev")
    write_stsb(tmp_path, "test", [])
    with pytest.raises(StsDataError, match="sts-test.csv: the file is empty"):
        load_senteval_task("stsb", tmp_path)
    write_sick(tmp_path, "SICK_test_annotated.txt", [])
    with pytest.raises(StsDataError, match="no pairs after the header"):
        load_senteval_task("sickr", tmp_path)
    (tmp_path / "SICK" / "SICK_test_annotated.txt").write_text("1\tA man\tA woman\t2.0\tNEUTRAL\n")
    with pytest.raises(StsDataError, match=r"SICK_test_annotated.txt:1: expected the header"):
        load_senteval_task("sickr", tmp_path)


def test_input_and_gold_files_must_align(tmp_path):
    write_sts13(tmp_path)
    (tmp_path / STS13 / "STS.gs.OnWN.txt").write_text("2.25\n4.5\n3.0\n")
    with pytest.raises(StsDataError, match="STS.input.OnWN.txt has 2 lines but .*STS.gs.OnWN.txt has 3"):
        load_senteval_task("sts13", tmp_path)


def test_unknown_tasks_and_splits_are_refused(tmp_path):
    with pytest.raises(StsDataError, match="unknown STS task 'sts17'"):
        load_senteval_task("sts17", tmp_path)
    with pytest.raises(StsDataError, match="sts13 has only a 'test' split"):
        load_senteval_task("sts13", write_sts13(tmp_path), "dev")
    with pytest.raises(StsDataError, match="each STS task may be requested once"):
        load_sts_tasks(["sts13", "sts13"], tmp_path)


# ---------------------------------------------------------------------------------------- hub (monkeypatched)


def fake_hub(monkeypatch, rows: dict[str, list]) -> list[tuple]:
    """Replace ``datasets.load_dataset`` by an in-memory ``Dataset``; returns the calls it gets."""
    import datasets

    calls = []

    def load_dataset(path, split=None, **kwargs):
        calls.append((path, split))
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_loader_maps_dev_to_validation(monkeypatch):
    rows = {"sentence1": ["a  dog", "a cat"], "sentence2": ["a dog", "a car"], "score": [5.0, 0.8]}
    calls = fake_hub(monkeypatch, rows)
    task = load_hub_task("stsb", "dev")
    assert calls == [("mteb/stsbenchmark-sts", "validation")]
    assert task.pairs == [StsPair("a dog", "a dog", 5.0), StsPair("a cat", "a car", 0.8)]
    assert load_hub_task("sts12").aggregated and calls[-1] == ("mteb/sts12-sts", "test")


def test_hub_loader_checks_splits_columns_scores_and_network(monkeypatch):
    calls = fake_hub(monkeypatch, {"sentence1": ["a"], "sentence2": ["b"], "score": [float("nan")]})
    with pytest.raises(StsDataError, match="mteb/sickr-sts has no 'dev' split"):
        load_hub_task("sickr", "dev")
    assert calls == []  # refused before any download
    with pytest.raises(StsDataError, match=r"mteb/sts15-sts \(test\) row 0: gold score nan is not a finite number"):
        load_hub_task("sts15")
    fake_hub(monkeypatch, {"text": ["a"], "score": [1.0]})
    with pytest.raises(StsDataError, match=r"missing columns \['sentence1', 'sentence2'\]"):
        load_hub_task("sts16")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'mteb/sts14-sts' on the Hub")

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(StsDataError, match=r"sts14 test: .*Pass --data_dir DIR .*DIR/STS/STS14-en-test/STS.input"):
        load_hub_task("sts14")


def test_without_network_the_hub_is_asked_once_and_the_error_names_the_flag_and_files(monkeypatch):
    """No network, HF_HUB_OFFLINE unset: one failed connection, then the datasets cache alone (no five retries and
    their warnings); not there, the error says which flag and which files would do."""
    import socket

    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(OSError("no network")))
    modes = []

    def load_dataset(path, split=None, **kwargs):
        modes.append((datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE))
        raise ConnectionError(f"Couldn't find {path} in the cache")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(StsDataError) as caught:
        load_hub_task("stsb", "dev")
    assert modes == [(True, True)] and (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE) == (False, False)
    assert str(caught.value) == (
        "stsb dev: mteb/stsbenchmark-sts (split 'validation'): not in the datasets cache, and the hub cannot be "
        f"reached ({constants.ENDPOINT}). Pass --data_dir DIR (data_dir= from Python): a SentEval-layout folder "
        "(SentEval's data/downstream) holding DIR/STS/STSBenchmark/sts-dev.csv (this repository ships it: "
        "--data_dir data/senteval)"
    )


PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class _Connection:
    def __init__(self, log: list) -> None:
        self.log = log

    def close(self) -> None:
        self.log.append("closed")


def test_the_hub_is_asked_with_one_connection_to_its_host_and_port_or_assumed_there_through_a_proxy(monkeypatch):
    import socket

    from huggingface_hub import constants

    from simcse_flat.evaluation.sts import _hub_reachable

    for key in PROXIES:
        monkeypatch.delenv(key, raising=False)
    log = []
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: log.append((address, timeout))
                        or _Connection(log))  # fmt: skip
    endpoints = [("https://huggingface.co", ("huggingface.co", 443)), ("http://hub.example", ("hub.example", 80)),
                 ("https://hub.example:8443", ("hub.example", 8443))]  # fmt: skip
    for endpoint, address in endpoints:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        log.clear()
        assert _hub_reachable() is True and log == [(address, 3.0), "closed"], endpoint
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(ConnectionRefusedError()))
    assert _hub_reachable() is False
    for key in PROXIES:  # a proxy: no connection tried (the one above would be refused), the hub assumed reachable
        monkeypatch.setenv(key, "http://proxy.example:3128")
        assert _hub_reachable() is True, key
        monkeypatch.delenv(key)


def test_a_failed_hub_load_says_whether_the_hub_was_offline_or_what_it_answered(monkeypatch):
    """HF_HUB_OFFLINE=1: no connection is tried and the message says so; online and reachable: the hub is asked as
    it is (not offline), and the message quotes the first line of its error, or the error as it is when blank."""
    import socket

    import datasets
    from huggingface_hub import constants

    modes, failure = [], [ConnectionError("Couldn't find it in the cache")]

    def load_dataset(path, split=None, **kwargs):
        modes.append((datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE))
        raise failure[0]

    def message(name: str, split: str = "test") -> str:
        with pytest.raises(StsDataError) as caught:
            load_hub_task(name, split)
        return str(caught.value)

    def no_connection(*args, **kwargs):
        raise AssertionError("a connection was tried")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", no_connection)
    assert message("sts14") == (
        "sts14 test: mteb/sts14-sts (split 'test'): not in the datasets cache, and the hub is offline "
        "(HF_HUB_OFFLINE=1). Pass --data_dir DIR (data_dir= from Python): a SentEval-layout folder (SentEval's "
        "data/downstream) holding DIR/STS/STS14-en-test/STS.input.*.txt and STS.gs.*.txt"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for key in PROXIES:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: _Connection([]))
    modes.clear()
    failure[0] = ConnectionError("  Couldn't reach 'mteb/stsbenchmark-sts' on the Hub (LocalEntryNotFoundError)\n"
                                 "a second line of detail")  # fmt: skip
    hint = ("Pass --data_dir DIR (data_dir= from Python): a SentEval-layout folder (SentEval's data/downstream) "
            "holding DIR/STS/STSBenchmark/sts-test.csv")  # fmt: skip
    assert message("stsb") == ("stsb test: mteb/stsbenchmark-sts (split 'test'): cannot load it from the hub "
                               f"(Couldn't reach 'mteb/stsbenchmark-sts' on the Hub (LocalEntryNotFoundError)). {hint}")
    assert modes == [(False, False)]
    failure[0] = ConnectionError(" ")
    blank = "stsb test: mteb/stsbenchmark-sts (split 'test'): cannot load it from the hub ( ). "
    assert message("stsb") == blank + hint  # a blank error as it is


def test_evaluate_sts_reads_the_hub_without_data_dir(monkeypatch):
    rows = {"sentence1": ["anchor"] * 3, "sentence2": ["cos 0.1", "cos 0.5", "cos 0.3"], "score": [1, 3, 2]}
    fake_hub(monkeypatch, rows)
    results = evaluate_sts(CosineEncoder(), ["sts12", "stsb"])
    assert results["sts12_all_spearman"] == pytest.approx(100) and results["sts12_wmean_spearman"] == pytest.approx(100)
    assert "sts12_test_spearman" not in results  # one unnamed sub-set: no per-sub-set figure
    assert results["stsb_spearman"] == pytest.approx(100) and results["primary_metric"] == "avg_spearman"


# ----------------------------------------------------------------------------------------------- scoring


class CosineEncoder:
    """Records each call; embeds ``"anchor"`` as ``3 e0``, ``"cos C"`` at cosine C from it, and any other sentence as
    a fixed pseudo-random 2-d vector.

    ``"cos C"`` has length 1/C², so its dot product with the anchor is 3/C: ranked by dot product the pairs come in
    the reverse order of their cosines, and only a scorer that normalises every vector gets the expected figures.
    """

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, sentences: list[str], batch_size: int = 8) -> np.ndarray:
        self.calls.append(list(sentences))
        return np.array([self.embed(sentence) for sentence in sentences], dtype=np.float32)

    @staticmethod
    def embed(sentence: str) -> list[float]:
        if sentence == "anchor":
            return [3.0, 0.0]
        if sentence.startswith("cos "):
            c = float(sentence.removeprefix("cos "))
            return [1 / c, math.sqrt(1 - c * c) / (c * c)]
        return np.random.default_rng(zlib.crc32(sentence.encode())).normal(size=2).tolist()


def pairs(gold: list[float], cosines: list[float]) -> list[StsPair]:
    return [StsPair("anchor", f"cos {c}", g) for g, c in zip(gold, cosines)]


def test_all_wmean_and_avg_match_hand_computation():
    x, y = pairs([1, 2, 3], [0.1, 0.3, 0.2]), pairs([1.5, 2.5, 3.5, 4.5], [0.4, 0.5, 0.6, 0.7])
    sts = StsTask("sts", {"x": x, "y": y}, aggregated=True)
    stsb = StsTask("stsb", {"test": pairs([0, 1, 2, 3, 4], [0.2, 0.1, 0.3, 0.5, 0.4])})
    results = evaluate_sts(CosineEncoder(), [sts, stsb])
    # x: rank differences (0, -1, 1): 1 - 6*2/(3*8) = 0.5; y: perfectly ordered = 1
    assert results["sts_x_spearman"] == pytest.approx(50) and results["sts_y_spearman"] == pytest.approx(100)
    assert results["sts_wmean_spearman"] == pytest.approx((3 * 50 + 4 * 100) / 7)
    # all, pooled: gold ranks (1,3,5,2,4,6,7) vs cosine ranks (1,3,2,4,5,6,7): sum d^2 = 14 -> 1 - 6*14/(7*48) = 0.75
    assert results["sts_all_spearman"] == pytest.approx(75)
    # stsb: d = (-1, 1, 0, -1, 1): 1 - 6*4/(5*24) = 0.8
    assert results["stsb_spearman"] == pytest.approx(80)
    assert results["avg_spearman"] == pytest.approx((75 + 80) / 2)
    assert (results["sts_n_pairs"], results["stsb_n_pairs"], results["primary_metric"]) == (7, 5, "avg_spearman")


def test_each_distinct_sentence_is_encoded_once_across_tasks(tmp_path):
    write_sts13(tmp_path)
    shared = [stsb_line("4", "a man plays a guitar .", "a dog runs ."), stsb_line("1", "the red car", "x")]
    write_stsb(tmp_path, "test", shared)  # three of its four sentences are also in sts13
    encoder = CosineEncoder()
    results = evaluate_sts(encoder, ["sts13", "stsb"], data_dir=tmp_path, batch_size=4)
    (call,) = encoder.calls
    expected = {s for name in ("sts13", "stsb") for pair in load_senteval_task(name, tmp_path).pairs for s in pair[:2]}
    assert len(call) == len(set(call)) and set(call) == expected
    assert "two dogs play" not in call  # unscored pairs are never encoded
    assert results["primary_metric"] == "avg_spearman" and results["sts13_n_pairs"] == 6


def test_single_task_headline_and_torch_output():
    task = StsTask("sickr", {"test": pairs([1, 2, 3], [0.1, 0.2, 0.3])})
    results = evaluate_sts(lambda sentences: torch.from_numpy(CosineEncoder()(sentences)), [task])
    assert results["primary_metric"] == "sickr_spearman" and results["sickr_spearman"] == pytest.approx(100)


def test_table_shows_each_task_the_average_and_the_aggregation():
    sts = StsTask("sts12", {"x": pairs([1, 2, 3], [0.1, 0.3, 0.2]), "y": pairs([1, 2], [0.1, 0.2])}, aggregated=True)
    table = format_sts_table(evaluate_sts(CosineEncoder(), [sts, StsTask("stsb", {"test": pairs([1, 2], [0.2, 0.1])})]))
    lines = table.splitlines()
    assert lines[0].split() == ["task", "pairs", "spearman", "wmean"]
    assert lines[1].split()[:2] == ["sts12", "5"] and lines[2].split() == ["stsb", "2", "-100.00"]
    assert lines[3].split()[0] == "avg" and "'all' aggregation" in lines[4]


# ------------------------------------------------------------------------- exact messages, provenance, layout


def test_loaded_tasks_carry_their_name_source_and_split(tmp_path, monkeypatch):
    write_sts13(tmp_path)
    dev = write_stsb(tmp_path, "dev", [stsb_line("4", "a", "b")])
    write_stsb(tmp_path, "test", [stsb_line("1", "c", "d")])
    sts13, stsb = load_sts_tasks(["sts13", "stsb"], tmp_path, "test")[0], load_sts_tasks(["stsb"], tmp_path, "dev")[0]
    assert (sts13.name, sts13.source) == ("sts13", str(tmp_path / STS13))
    assert (stsb.name, stsb.source, stsb.pairs) == ("stsb", str(dev), [StsPair("a", "b", 4.0)])
    calls = fake_hub(monkeypatch, {"sentence1": ["a"], "sentence2": ["b"], "score": [1.0]})
    hub = load_sts_tasks(["stsb"], None, "dev")[0]
    assert calls == [("mteb/stsbenchmark-sts", "validation")] and hub.source == "mteb/stsbenchmark-sts"


def test_senteval_data_folder_is_read_through_its_downstream_folder(tmp_path):
    write_stsb(tmp_path / "data" / "downstream", "test", [stsb_line("4", "a", "b")])
    assert load_senteval_task("stsb", tmp_path / "data").pairs == [StsPair("a", "b", 4.0)]
    # a folder holding STS/ itself is the root, even beside a downstream/ folder
    write_stsb(tmp_path / "data", "test", [stsb_line("1", "c", "d")])
    assert load_senteval_task("stsb", tmp_path / "data").pairs == [StsPair("c", "d", 1.0)]


def test_error_messages_name_the_problem_in_full(tmp_path, monkeypatch):
    def message(call, *args) -> str:
        with pytest.raises(StsDataError) as caught:
            call(*args)
        return str(caught.value)

    assert message(load_sts_tasks, []) == f"no STS tasks requested; choose from {list(TASK_NAMES)}"
    assert message(load_senteval_task, "stsb", tmp_path, "validation") == (
        "stsb has no 'validation' split; choose from ['train', 'dev', 'test']")
    assert message(load_senteval_task, "stsb", tmp_path, "dev").startswith("STS data file not found: ")
    assert message(load_hub_task, "sickr", "dev") == (
        "mteb/sickr-sts has no 'dev' split (it has ['test']); for sickr dev, pass a SentEval folder as data_dir")
    fake_hub(monkeypatch, {"sentence1": [], "sentence2": [], "score": []})
    assert message(load_hub_task, "stsb") == "mteb/stsbenchmark-sts (test) has no rows"
    fake_hub(monkeypatch, {"sentence1": ["a"], "sentence2": [" "], "score": [1.0]})
    assert message(load_hub_task, "stsb") == "mteb/stsbenchmark-sts (test) row 0: sentence 2 is empty"

    stsb = write_stsb(tmp_path, "test", [stsb_line("1", "a", "b"), stsb_line("1", "", "b")])
    assert message(load_senteval_task, "stsb", tmp_path) == f"{stsb}:2: sentence 1 is empty"
    write_stsb(tmp_path, "test", [stsb_line("9", "a", "b")])
    assert message(load_senteval_task, "stsb", tmp_path) == f"{stsb}:1: gold score '9' is outside [0, 5]"
    sick = write_sick(tmp_path, "SICK_test_annotated.txt", [])
    sick.write_text("x" * 100 + "\n")
    assert message(load_senteval_task, "sickr", tmp_path) == (
        f"{sick}:1: expected the header {SICK_HEADER!r}, found {'x' * 80!r}")

    write_sts13(tmp_path)
    folder = tmp_path / STS13
    (folder / "STS.input.OnWN.txt").write_text("a\t \n")
    (folder / "STS.gs.OnWN.txt").write_text("1\n")
    assert message(load_senteval_task, "sts13", tmp_path) == f"{folder / 'STS.input.OnWN.txt'}:1: sentence 2 is empty"
    (folder / "STS.gs.OnWN.txt").write_text("1\n2\n")
    assert message(load_senteval_task, "sts13", tmp_path) == (
        f"{folder / 'STS.input.OnWN.txt'} has 1 lines but {folder / 'STS.gs.OnWN.txt'} has 2; they must align line by line")


def test_encode_gets_the_batch_size_and_must_return_one_row_per_sentence():
    batch_sizes = []

    def encode(sentences, **kwargs):
        batch_sizes.append(kwargs.get("batch_size"))
        return CosineEncoder()(sentences)

    task = StsTask("stsb", {"test": pairs([1, 2], [0.1, 0.2])})
    evaluate_sts(encode, [task], batch_size=3)
    evaluate_sts(encode, [task])
    assert batch_sizes == [3, None]
    for wrong in (lambda sentences: np.zeros((len(sentences), 1, 2)), lambda sentences: np.zeros((1, 2))):
        with pytest.raises(ValueError, match=r"^encode returned shape \(.*\) for 3 sentences; expected \(3, D\)$"):
            evaluate_sts(wrong, [task])


def test_table_lines_in_full():
    sts = StsTask("sts12", {"x": pairs([1, 2, 3], [0.1, 0.3, 0.2]), "y": pairs([1, 2], [0.1, 0.2])}, aggregated=True)
    stsb = StsTask("stsb", {"test": pairs([1, 2], [0.1, 0.2])})
    assert format_sts_table(evaluate_sts(CosineEncoder(), [stsb])).splitlines() == [
        "task      pairs  spearman", "stsb          2    100.00", "avg                100.00",
        "spearman: cosine Spearman x 100",
    ]
    lines = format_sts_table(evaluate_sts(CosineEncoder(), [sts, stsb])).splitlines()
    # the figures are checked in test_all_wmean_and_avg_match_hand_computation; here the layout and the wording
    assert lines[0] == "task      pairs  spearman   wmean" and lines[2] == "stsb          2    100.00"
    assert lines[1].startswith("sts12         5") and len(lines[1].split()) == 4
    assert lines[3].startswith("avg                ") and len(lines[3].split()) == 2
    assert lines[4] == ("spearman: cosine Spearman x 100; for sts12 SentEval's 'all' aggregation (one Spearman over "
                        "the pooled sub-sets, SimCSE's figure); wmean: the sub-sets' Spearmans weighted by size")
    two = format_sts_table(evaluate_sts(CosineEncoder(), [sts, StsTask("sts13", sts.subsets, aggregated=True)]))
    assert "; for sts12, sts13 SentEval's 'all' aggregation" in two


# ------------------------------------------------------------------------------ real data and command line


@pytest.mark.slow
def test_minilm_matches_sentence_transformers_evaluator(shared_data, minilm_path):
    """STS-B test and SICK-R test: our figure equals EmbeddingSimilarityEvaluator's on the same pairs."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    from simcse_flat.models.text import SentenceEncoder

    tasks = load_sts_tasks(["stsb", "sickr"], shared_data / "senteval")
    assert [len(task.pairs) for task in tasks] == [1379, 4927]
    encoder = SentenceEncoder.from_pretrained(minilm_path, pooler="mean")
    encoder.max_seq_length = encoder.longest_input  # what evaluate_sts.py uses: untruncated, as SimCSE evaluates
    ours = evaluate_sts(encoder.encode, tasks, batch_size=64)
    model = SentenceTransformer(minilm_path, device="cpu")
    model.max_seq_length = encoder.max_seq_length
    for task in tasks:
        evaluator = EmbeddingSimilarityEvaluator(
            *zip(*task.pairs), batch_size=64, similarity_fn_names=["cosine"], name=task.name, write_csv=False
        )
        theirs = 100 * evaluator(model)[evaluator.primary_metric]
        assert ours[f"{task.name}_spearman"] == pytest.approx(theirs, abs=1e-4)  # measured: 0 and 4.7e-6


def test_cli_writes_table_and_json(tiny_bert, tmp_path):
    write_sts13(tmp_path)
    write_stsb(tmp_path, "dev", [stsb_line("4", "a man is playing", "a man plays"), stsb_line("1", "a dog", "the car"),
                                 stsb_line("2.5", "two women", "some people")])  # fmt: skip
    output = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "evaluate_sts.py"), str(tiny_bert), "--pooler", "mean", "--tasks", "stsb",
         "--split", "dev", "--data_dir", str(tmp_path), "--output", str(output), "--batch_size", "2"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    saved = json.loads(output.read_text())
    assert saved["settings"]["split"] == "dev" and saved["settings"]["max_seq_length"] == 64  # the tiny BERT's max
    assert saved["results"]["stsb_n_pairs"] == 3 and saved["results"]["primary_metric"] == "stsb_spearman"
    assert f"{saved['results']['stsb_spearman']:.2f}" in run.stdout

    bad = subprocess.run([sys.executable, str(ROOT / "evaluate_sts.py"), str(tiny_bert), "--tasks", "sts13", "--split",
                          "dev", "--data_dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "error: sts13 has only a 'test' split (SimCSE selects checkpoints on stsb dev)"


def test_the_commands_print_a_hub_warning_once():
    import subprocess
    import sys

    code = ("import logging, huggingface_hub; from simcse_flat.cli import run_cli; "
            "run_cli(lambda: logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s'))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr.count("Retrying in 1s") == 1, done.stderr
