"""Sharded training (FSDP2 through accelerate): two gloo processes under ``configs/accelerate/fsdp.yaml`` train a tiny
random decoder as one process at twice the batch, a SIGKILLed sharded run resumes bit-identically, and what cannot
work under FSDP fails before training in one line.

accelerate shards on GPUs only, so the launched runs go through ``tests/fsdp_on_cpu.py`` (a CPU-only override of
accelerate's state, nothing else); the command is otherwise the user's: ``accelerate launch --config_file
configs/accelerate/fsdp.yaml train.py ...``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import write_tiny_decoder
from safetensors.torch import load_file
from test_trainer import _argv, _losses, kill_past_a_checkpoint
from test_training_runs import _kill_with_workers, _launch_command, _launch_two_processes, _start_launched

from simcse_flat.config import ConfigError, parse_config
from simcse_flat.run_folder import read_log
from simcse_flat.sharding import check_sharding
from simcse_flat.trainer import train

ROOT = Path(__file__).resolve().parents[1]
FSDP_CONFIG = ("--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"))
ON_CPU = (str(ROOT / "tests" / "fsdp_on_cpu.py"), str(ROOT / "train.py"))  # the CPU-only override, then train.py
SENTEVAL_SAMPLE = ROOT / "data" / "senteval"  # the quickstart's STS-B dev copy
SENTENCES = ["a man is playing a guitar", "the dog runs in the park", "two children are eating", "x"]

# each loss (with one of the loop's other paths) under FSDP: transformers' checkpointing and STS evaluation (best/),
# GradCache (its replay, EMC²'s extra pass of chain negatives through it), LoRA adapters (the checkpoint holds them,
# final/ too: the adapters alone, from the gathered copy)
CASES = {
    "infonce": ("--loss", "infonce", "--lora_r", "4", "--lora_export", "adapter"),
    "flatnce": ("--loss", "flatnce", "--gradient_checkpointing", "true", "--eval_steps", "2", "--eval_tasks", "stsb",
                "--eval_split", "dev"),  # and --eval_data_dir: the first pairs of STS-B dev (_sts_sample)
    "emc2": ("--loss", "emc2", "--grad_cache_chunk_size", "12"),
    "sogclr": ("--loss", "sogclr"),  # its per-sample u, gathered over the processes as the embeddings are
    "dclw": ("--loss", "dcl", "--dcl_weight_sigma", "0.5"),  # DCLW's weights from the gathered cosines
}  # fmt: skip


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    """A 2-layer Qwen2 of width 32 without dropout: each process would draw its own masks."""
    return write_tiny_decoder(tmp_path_factory.mktemp("fsdp_qwen2"))


def _run(decoder: Path, tmp_path: Path, *extra: str) -> list[str]:
    if "--eval_steps" in extra:
        extra = (*extra, "--eval_data_dir", str(_sts_sample(tmp_path / "senteval")))
    return _argv(decoder, tmp_path, "--pooler", "lasttoken", "--max_steps", "4", "--save_steps", "4", *extra)


def _sts_sample(folder: Path, pairs: int = 100) -> Path:
    """A SentEval-layout folder holding the first ``pairs`` of the quickstart's STS-B dev copy (seconds to score)."""
    task = folder / "STS" / "STSBenchmark"
    task.mkdir(parents=True)
    lines = (SENTEVAL_SAMPLE / "STS" / "STSBenchmark" / "sts-dev.csv").read_text().splitlines(keepends=True)
    (task / "sts-dev.csv").write_text("".join(lines[:pairs]))
    return folder


def _launch_fsdp(argv: list[str], **how) -> str:
    return _launch_two_processes(argv, launcher=FSDP_CONFIG, script=ON_CPU, **how)


def _logged(run: Path, key: str = "loss") -> dict[int, float]:
    return {row["step"]: row[key] for row in read_log(run) if key in row}


def _largest_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("loss", list(CASES))
def test_two_fsdp_processes_train_like_one_with_twice_the_batch(decoder, tmp_path, loss):
    one = train(parse_config(_run(decoder, tmp_path / "one", *CASES[loss], "--per_device_train_batch_size", "16")))
    _launch_fsdp(_run(decoder, tmp_path / "two", *CASES[loss]))
    runs = [tmp_path / "one" / "run", tmp_path / "two" / "run"]
    expected, got = _losses(one), _logged(runs[1])
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    assert max(abs(got[s] - expected[s]) for s in expected) <= 1e-5, (expected, got)
    # the checkpoint: the gathered weights and the gathered optimizer moments, in the one-process layout
    for name in ("model", "optimizer"):
        tensors = [load_file(str(run / "checkpoint-4" / f"{name}.safetensors")) for run in runs]
        difference = _largest_difference(*tensors)
        print(f"{loss}: largest |difference| of {name} tensors {difference:.2e}")
        assert difference <= 1e-5, (name, difference)
    layouts = [(run / "checkpoint-4" / "optimizer.json").read_text() for run in runs]
    assert layouts[0] == layouts[1]  # the moments by position, with the same parameter groups
    # the export: a plain sentence-transformers folder of the gathered weights
    from sentence_transformers import SentenceTransformer

    exported = [SentenceTransformer(str(run / "final"), device="cpu").encode(SENTENCES) for run in runs]
    assert np.abs(exported[0] - exported[1]).max() <= 1e-5
    assert all((run / "final" / "adapter_config.json").exists() == ("--lora_export" in CASES[loss]) for run in runs)
    if "--eval_steps" in CASES[loss]:  # evaluated on the gathered copy, best/ exported from it
        scores = [_logged(run, "eval/stsb_spearman") for run in runs]
        assert sorted(scores[1]) == [0, 2, 4] and scores[1] == pytest.approx(scores[0], abs=1e-3), scores
        best = [SentenceTransformer(str(run / "best"), device="cpu").encode(SENTENCES) for run in runs]
        assert np.abs(best[0] - best[1]).max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    # EMC²: its chains (the loss's state) must survive too; 40 sentences at 16 a step are 2 steps an epoch. bf16, as
    # the decoder recipe trains: FSDP's mixed precision keeps fp32 weights and moments, in the checkpoint too
    ("--loss", "emc2", "--mixed_precision", "bf16"),
    ("--loss", "flatnce", "--lora_r", "4"),  # the checkpoint holds the adapters only: read into the gathered model
], ids=["emc2-bf16", "flatnce-lora"])  # fmt: skip
def test_a_killed_fsdp_run_resumes_bit_identically(decoder, tmp_path, settings):
    run = ("--max_steps", "10", "--save_steps", "3", "--save_total_limit", "5", *settings)
    _launch_fsdp(_run(decoder, tmp_path / "whole", *run))
    killed = tmp_path / "killed" / "run"
    victim = _start_launched(_launch_command(_run(decoder, tmp_path / "killed", *run), FSDP_CONFIG, ON_CPU),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    kill_past_a_checkpoint(victim, killed, kill=lambda: _kill_with_workers(victim.pid))
    assert max(_logged(killed)) < 10  # killed mid-run: the resumed run has steps to train
    _launch_fsdp(_run(decoder, tmp_path / "killed", *run, "--resume_from", "latest"))
    whole = tmp_path / "whole" / "run"
    assert _logged(killed) == _logged(whole) and sorted(_logged(whole)) == list(range(1, 11))  # bit for bit
    for name in ("model.safetensors", "optimizer.safetensors", "loss_state.safetensors"):
        assert (killed / "checkpoint-9" / name).read_bytes() == (whole / "checkpoint-9" / name).read_bytes(), name
    assert (killed / "final" / "model.safetensors").read_bytes() == (whole / "final" / "model.safetensors").read_bytes()
    weights = load_file(str(killed / "checkpoint-9" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert all(".lora_" in name for name in weights) == ("--lora_r" in settings)


@pytest.mark.slow
def test_the_fsdp_config_where_accelerate_cannot_shard_fails_in_one_line(decoder, tmp_path):
    # on CPUs accelerate sets an FSDP config up as DDP (MULTI_CPU): refused before the model loads
    output = _launch_two_processes(_run(decoder, tmp_path), launcher=FSDP_CONFIG, succeed=False)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {_NOT_SHARDED.format('MULTI_CPU', 2)}"], output[-3000:]
    assert not (tmp_path / "run" / "log.jsonl").exists()


_NOT_SHARDED = ("the accelerate config asks for FSDP, but accelerate did not shard (distributed type {}, {} "
                "process(es)): it shards on GPUs only; on CPUs launch with --multi_gpu instead (DDP on gloo)")


def test_an_fsdp_config_run_as_unconnected_processes_is_refused(monkeypatch):
    # without ACCELERATE_USE_CPU, accelerate on CPUs sets every launched process up alone (distributed type NO)
    from accelerate.utils import DistributedType

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch sets from the FSDP config
    alone = SimpleNamespace(distributed_type=DistributedType.NO, num_processes=1)
    with pytest.raises(ConfigError, match=f"^{re.escape(_NOT_SHARDED.format('NO', 1))}$"):
        check_sharding(parse_config(["--model_name_or_path", "x"]), alone)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_sharding(parse_config(["--model_name_or_path", "x"]), alone)  # no FSDP asked: nothing to refuse


def _fsdp_accelerator(**plugin) -> SimpleNamespace:
    from accelerate.utils import DistributedType

    settings = {"fsdp_version": 2, "activation_checkpointing": False, "cpu_ram_efficient_loading": False, **plugin}
    return SimpleNamespace(distributed_type=DistributedType.FSDP, num_processes=2,
                           state=SimpleNamespace(fsdp_plugin=SimpleNamespace(**settings)))  # fmt: skip


@pytest.mark.parametrize("flags, plugin, message", [
    ((), {"fsdp_version": 1}, "fsdp_version: 1 in the accelerate config: simcse_flat shards with FSDP2 only"),
    (("--modality", "vision"), {}, "modality: vision with FSDP: sharding is offered for text encoders"),
    (("--loss", "emc2", "--emc2_estimator", "stored"), {}, "emc2_estimator: stored with FSDP: it encodes a different"),
    (("--mixed_precision", "fp16"), {}, "mixed_precision: fp16 with FSDP is not supported"),
    ((), {"activation_checkpointing": True}, "fsdp_activation_checkpointing: true in the accelerate config: use "
                                             "gradient_checkpointing: true"),
    ((), {"cpu_ram_efficient_loading": True}, "fsdp_cpu_ram_efficient_loading: true in the accelerate config"),
])  # fmt: skip
def test_what_fsdp_cannot_do_is_refused_in_one_line(flags, plugin, message):
    model = [] if "--modality" in flags else ["--model_name_or_path", "x"]  # a text setting: refused in a vision run
    config = parse_config([*model, *flags])
    with pytest.raises(ConfigError, match=f"^{message}") as error:
        check_sharding(config, _fsdp_accelerator(**plugin))
    assert "\n" not in str(error.value)
    check_sharding(parse_config(["--model_name_or_path", "x"]), _fsdp_accelerator())  # the supported setting


@pytest.mark.parametrize("model_type, units", [
    ("qwen2", ["Qwen2DecoderLayer"] * 2), ("qwen3", ["Qwen3DecoderLayer"] * 2),
    ("bert", ["BertEmbeddings", "BertLayer", "BertLayer"]),  # transformers keeps BERT's embeddings whole too
])  # fmt: skip
def test_the_wrap_unit_is_the_transformer_layer_and_the_copy_holds_no_weights(decoder, tiny_bert, tmp_path,
                                                                              model_type, units):  # fmt: skip
    # accelerate's own choice of units (TRANSFORMER_BASED_WRAP, no class named in the config): the model's layers
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from simcse_flat.models.text import SentenceEncoder
    from simcse_flat.sharding import ShardedModel

    folder = {"qwen2": decoder, "bert": tiny_bert}.get(model_type) or write_tiny_decoder(tmp_path, model_type)
    encoder = SentenceEncoder.from_pretrained(str(folder))
    sharded = ShardedModel(SimpleNamespace(is_main_process=True), encoder)  # as the trainer builds it
    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy, transformer_cls_names_to_wrap=None)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, encoder)
    assert [type(module).__name__ for module in encoder.modules() if policy(module)] == units  # 2 layers each
    assert {p.device.type for p in sharded.template.parameters()} == {"meta"}  # the structure only
    assert {p.device.type for p in encoder.parameters()} == {"cpu"}  # the model itself untouched


def test_the_decoder_recipe_names_the_fsdp_command():
    recipe = (ROOT / "configs" / "decoder_qwen3_embedding.yaml").read_text()
    assert "accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 8 train.py --config " \
           "configs/decoder_qwen3_embedding.yaml" in recipe


def test_a_step_that_evaluates_checkpoints_and_exports_gathers_the_weights_once(decoder, tmp_path, monkeypatch):
    # the gathering path (ShardedModel) on one unsharded process, where the gather is a plain state dict: its files
    # are the plain path's, and steps 0, 2 and 4 gather once each (step 4 evaluates, checkpoints and writes final/)
    import torch.distributed.checkpoint.state_dict as state_dict

    import simcse_flat.run

    flags = ("--save_steps", "2", "--eval_steps", "2", "--eval_tasks", "stsb", "--eval_split", "dev")
    plain = train(parse_config(_run(decoder, tmp_path / "plain", *flags)))
    gathered, gather = [], state_dict.get_model_state_dict
    monkeypatch.setattr(state_dict, "get_model_state_dict", lambda *a, **k: gathered.append(1) or gather(*a, **k))
    monkeypatch.setattr(simcse_flat.run, "is_sharded", lambda accelerator: True)
    through_gather = train(parse_config(_run(decoder, tmp_path / "gathered", *flags)))
    assert len(gathered) == 3, gathered
    assert _losses(through_gather) == _losses(plain)
    for folder in ("checkpoint-4", "final", "best"):
        name = "model.safetensors"
        assert (through_gather.output_dir / folder / name).read_bytes() == (plain.output_dir / folder / name).read_bytes()
