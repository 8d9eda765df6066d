"""Training sources: several files in one run (each batch from one), duplicates counted or dropped, and an order of
batches that is a function of (seed, epoch) only, so resuming stays exact."""

from __future__ import annotations

import hashlib

import pytest
import torch

from simcse_flat.data.batching import SourceBatchSampler
from simcse_flat.data.text import SourcesDataset, content_key, load_train_source
from simcse_flat.trainer import train

from conftest import WORDS
from test_trainer import _config, _losses


def _source_of(batch: list[int], sizes: list[int]) -> int:
    offsets = [sum(sizes[:s]) for s in range(len(sizes) + 1)]
    sources = {next(s for s in range(len(sizes)) if offsets[s] <= i < offsets[s + 1]) for i in batch}
    assert len(sources) == 1, f"a batch mixes sources {sources}"
    return sources.pop()


@pytest.mark.parametrize("processes", [1, 2])
def test_one_source_keeps_the_order_of_a_dataloader_over_a_seeded_permutation(processes):
    sampler = SourceBatchSampler([43], batch_size=4, num_processes=processes, seed=5)
    sampler.set_epoch(3)
    permutation = torch.randperm(43, generator=torch.Generator().manual_seed(5 * 1_000_003 + 3)).tolist()
    batches = [permutation[i : i + 4] for i in range(0, 40, 4)]  # drop_last
    usable = len(batches) - len(batches) % processes  # every process gets as many batches
    assert list(sampler) == batches[:usable] and len(sampler) == usable


def _stream_generator(seed: int, epoch: int, stream: int, pass_: int) -> torch.Generator:
    """The seed of each permutation, as ``data/batching.py`` documents it: a checkpoint resumed by a later release
    replays the same order only while this stays as it is."""
    if (stream, pass_) == (0, 0):
        return torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    digest = hashlib.blake2b(f"{seed}/{epoch}/{stream}/{pass_}".encode(), digest_size=7).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def test_the_order_of_several_sources_is_the_documented_function_of_seed_and_epoch():
    sizes, batch, seed, epoch = [12, 5], 2, 7, 2
    sampler = SourceBatchSampler(sizes, batch_size=batch, num_processes=1, seed=seed, weights=[1.0, 2.0])
    sampler.set_epoch(epoch)
    steps = [6, 4]  # 12 // 2; 5 // 2 = 2, twice (weight 2): a second pass over a new permutation
    order = [s for s, n in enumerate(steps) for _ in range(n)]
    schedule = [order[i] for i in torch.randperm(10, generator=_stream_generator(seed, epoch, 2, 0)).tolist()]
    batches = {0: [], 1: []}
    for source, offset, passes in ((0, 0, 1), (1, 12, 2)):
        usable = sizes[source] - sizes[source] % batch  # drop_last
        for pass_ in range(passes):
            ids = torch.randperm(sizes[source], generator=_stream_generator(seed, epoch, source, pass_)).tolist()
            batches[source] += [[i + offset for i in ids[k : k + batch]] for k in range(0, usable, batch)]
    expected = [batches[source].pop(0) for source in schedule]
    assert list(sampler) == expected


def test_proportional_sampling_uses_every_batch_of_every_source_once_an_epoch_in_a_shuffled_order():
    sizes = [40, 17, 24]
    sampler = SourceBatchSampler(sizes, batch_size=4, num_processes=2, seed=1)
    epochs = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert batches == list(sampler)  # a function of (seed, epoch) only
        sources = [_source_of(b, sizes) for b in batches]
        assert sources[0::2] == sources[1::2]  # the two processes of one step draw from one source
        assert [sources.count(s) for s in range(3)] == [10, 4, 6]  # 40 // 8 = 5 steps, 17 // 8 = 2, 24 // 8 = 3
        ids = [i for b in batches for i in b]
        assert len(ids) == len(set(ids))  # no example twice in an epoch
        epochs.append(sources)
    assert epochs[0] != epochs[1] and sorted(epochs[0]) == sorted(epochs[1])


def test_weights_repeat_a_source_with_a_fresh_permutation_each_pass():
    sampler = SourceBatchSampler([8, 8], batch_size=4, num_processes=1, seed=0, weights=[2.0, 0.5])
    batches = list(sampler)
    first = [tuple(b) for b in batches if _source_of(b, [8, 8]) == 0]
    assert len(first) == 4 and sorted(i for b in first for i in b) == sorted(list(range(8)) * 2)
    assert [_source_of(b, [8, 8]) for b in batches].count(1) == 1


def test_a_weighted_source_of_no_whole_number_of_batches_yields_full_batches_only():
    """10 examples, batches of 4, weight 2: 4 batches over two passes, each pass dropping its last 2 (drop_last)."""
    sampler = SourceBatchSampler([10, 8], batch_size=4, num_processes=1, seed=0, weights=[2.0, 1.0])
    batches = [b for b in sampler if _source_of(b, [10, 8]) == 0]
    assert len(batches) == 4 and all(len(b) == 4 for b in batches)
    for first, second in (batches[:2], batches[2:]):  # one pass: 8 different examples
        assert len(set(first) | set(second)) == 8
    assert batches[:2] != batches[2:]  # the second pass draws a fresh permutation, not the first one again


def test_sampler_settings_that_cannot_work_are_refused_with_their_reason():
    cases = [
        ({"sampling": "random"}, r"^dataset_sampling must be one of proportional, round_robin, got 'random'$"),
        ({"sampling": "round_robin", "weights": [1.0, 2.0]},
         r"^weights need proportional sampling and one weight per source$"),
        ({"weights": [1.0]}, r"^weights need proportional sampling and one weight per source$"),
        ({"batch_size": 16}, r"^no source has one step of 1 x 16 examples$"),
    ]  # fmt: skip
    for settings, message in cases:
        with pytest.raises(ValueError, match=message):
            SourceBatchSampler(**{"sizes": [10, 8], "batch_size": 4, "num_processes": 1, "seed": 0, **settings})


def test_two_sources_are_shuffled_too():
    """With two sources the steps' order is shuffled as with three (not all of one source, then the other)."""
    sampler = SourceBatchSampler([40, 40], batch_size=4, num_processes=1, seed=3)
    sources = [_source_of(b, [40, 40]) for b in sampler]
    assert sorted(sources) == [0] * 10 + [1] * 10 and sources != sorted(sources)


def test_round_robin_takes_the_sources_in_turn_until_the_smallest_runs_out():
    sampler = SourceBatchSampler([40, 12], batch_size=4, num_processes=1, seed=0, sampling="round_robin")
    assert [_source_of(b, [40, 12]) for b in sampler] == [0, 1, 0, 1, 0, 1]


def test_sources_share_one_id_space(tmp_path):
    (tmp_path / "a.txt").write_text("first\nsecond\n")
    (tmp_path / "b.csv").write_text("sent0,sent1\np,q\nr,s\nt,u\n")
    data = SourcesDataset([load_train_source(str(tmp_path / name)) for name in ("a.txt", "b.csv")])
    assert len(data) == 5 and data.sizes == [2, 3]
    assert (data[1]["text"], data[1]["idx"]) == ("second", 1)
    assert (data[4]["sent0"], data[4]["idx"]) == ("t", 4)


def test_duplicates_are_counted_or_dropped(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("a man rides a horse\nA dog barks\na man  rides a horse \nthe sun\nA dog barks\na man rides a horse\n")
    source = load_train_source(str(path))
    assert source.notes == ["3 duplicates"] and len(source.dataset) == 6
    deduped = load_train_source(str(path), dedupe=True)
    assert deduped.notes == ["3 duplicates dropped (dedupe)"]
    assert list(deduped.dataset["text"]) == ["a man rides a horse", "A dog barks", "the sun"]
    assert content_key("a man  rides a horse ") == content_key("a man rides a horse") != content_key("A man rides a horse")


def test_a_run_on_a_text_file_and_a_triples_file_trains_each_batch_from_one_and_resumes_exactly(tiny_bert, tmp_path, monkeypatch):
    import simcse_flat.trainer as trainer

    triples = tmp_path / "nli.csv"
    triples.write_text("sent0,sent1,hard_neg\n" + "".join(f"a man {w},the man {w},no dog {w}\n" for w in WORDS[:24]))
    views, real = [], trainer.contrastive_loss_on_views

    def count_views(loss_fn, embeddings, sample_ids, *args, **kwargs):
        views.append(embeddings.size(0) // sample_ids.size(0))
        return real(loss_fn, embeddings, sample_ids, *args, **kwargs)

    monkeypatch.setattr(trainer, "contrastive_loss_on_views", count_views)

    def run(folder, *extra):
        config = _config(tiny_bert, tmp_path / folder, "--max_steps", "14", "--save_steps", "5", "--save_total_limit", "5",
                         "--loss", "sogclr", *extra)
        config.data.train_file = [str(tmp_path / folder / "train.txt"), str(triples)]
        return train(config)

    whole = run("whole")
    assert sorted(set(views)) == [2, 3] and len(views) == 14  # 40 sentences / 8 = 5 steps, 24 triples / 8 = 3
    # step 10 is the second step of epoch 1: the resumed run must replay that epoch's order from its third step
    resumed = run("whole_copy", "--resume_from", str(tmp_path / "whole" / "run" / "checkpoint-10"))
    assert sorted(_losses(resumed)) == [11, 12, 13, 14]
    for step, loss in _losses(resumed).items():
        assert loss == pytest.approx(_losses(whole)[step], abs=1e-6), step


def test_a_source_smaller_than_one_step_is_named(tiny_bert, tmp_path):
    from simcse_flat.data.text import DataError

    (tmp_path / "tiny.txt").write_text("one\ntwo\nthree\n")
    config = _config(tiny_bert, tmp_path, "--max_steps", "2")
    config.data.train_file = [config.data.train_file[0], str(tmp_path / "tiny.txt")]
    with pytest.raises(DataError, match=r"tiny\.txt: 3 examples, fewer than one batch of 8"):
        train(config)
