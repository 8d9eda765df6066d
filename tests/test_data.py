"""Bad training data fails before training, with the file, the line and what is wrong."""

from __future__ import annotations

import pytest
import torch

from simcse_flat.data.text import ContrastiveCollator, DataError, load_train_source, read_sentences, read_triples


def test_sentences_are_read_one_per_line(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("first sentence\nsecond, with a comma\n")
    assert read_sentences(path) == (["first sentence", "second, with a comma"], 0)


def test_blank_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("one paragraph.\n\nanother one.\n   \n\nthird.\n")  # paragraph breaks, one of spaces
    assert read_sentences(path) == (["one paragraph.", "another one.", "third."], 3)
    source = load_train_source(str(path))
    assert list(source.dataset["text"]) == ["one paragraph.", "another one.", "third."]
    assert source.notes == ["3 blank lines skipped"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"  \n\n", "empty"),
        (b"ok\nbad \xff byte\n", r"s\.txt:2: not valid UTF-8 \(byte 0xff at column 5\)"),
    ],
)
def test_bad_sentence_files_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "s.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_train_source(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_train_source(str(tmp_path / "nope.txt"))


def test_triples_with_and_without_hard_negatives(tmp_path):
    path = tmp_path / "nli.csv"
    path.write_text('sent0,sent1,hard_neg\n"a, quoted",b,c\nd,e,f\n')
    assert read_triples(path) == {"sent0": ["a, quoted", "d"], "sent1": ["b", "e"], "hard_neg": ["c", "f"]}
    path.write_text("sent0,sent1\na,b\n")
    assert load_train_source(str(path)).dataset.column_names == ["sent0", "sent1", "key"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("premise,hypothesis\na,b\n", r"nli\.csv:1: header must be"),
        ("sent0,sent1,hard_neg\na,b,c\nd,e\n", r"nli\.csv:3: expected 3 fields"),
        ("sent0,sent1\na,\n", r"nli\.csv:2: empty sent1"),
        ("sent0,sent1\n", "no rows"),
        # a quote opened on line 2 and never closed swallows the rest: the error is at line 2, where it opens
        ('sent0,sent1,hard_neg\na,"b,c\nd,e,f\n' + "g,h,i\n" * 9, r"nli\.csv:2: expected 3 fields .*runs on to line 12"),
    ],
)
def test_bad_csv_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "nli.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_triples(path)


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("{}")
    with pytest.raises(DataError, match="unsupported file type"):
        load_train_source(str(path))


def test_hub_dataset_is_loaded_through_datasets(monkeypatch):
    from datasets import Dataset

    seen = {}

    def fake_load_dataset(name, split):
        seen.update(name=name, split=split)
        return Dataset.from_dict({"text": ["a", "b"], "other": [1, 2]})

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    dataset = load_train_source("someone/wiki1m", split="train").dataset
    assert seen == {"name": "someone/wiki1m", "split": "train"}
    assert dataset.column_names == ["text", "key"]


def test_collator_lays_out_views_view_major(tiny_bert):
    from transformers import AutoTokenizer

    collate = ContrastiveCollator(AutoTokenizer.from_pretrained(tiny_bert), max_length=16)
    unsup = collate([{"text": "a man", "idx": 7}, {"text": "the dog is big", "idx": 3}])
    assert unsup["input_ids"].shape[0] == 4
    torch.testing.assert_close(unsup["input_ids"][:2], unsup["input_ids"][2:])
    assert unsup["sample_ids"].tolist() == [7, 3]
    sup = collate([{"sent0": "a", "sent1": "b", "hard_neg": "c", "idx": 0}, {"sent0": "d", "sent1": "e", "hard_neg": "f", "idx": 1}])
    assert sup["input_ids"].shape[0] == 6
