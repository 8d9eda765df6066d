"""Configuration: yaml then command line, typed, unknown keys rejected with the closest valid name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from simcse_flat.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("loss: flatnce\nper_device_train_batch_size: 16\neval_tasks: [stsb, sickr]\n")
    config = parse_config(["--config", str(path), "--per_device_train_batch_size", "8"])
    assert config.loss.loss == "flatnce"
    assert config.training.per_device_train_batch_size == 8
    assert config.training.eval_tasks == ["stsb", "sickr"]


def test_unknown_yaml_key_names_line_and_closest(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("loss: infonce\nlearnig_rate: 1e-5\n")
    with pytest.raises(ConfigError, match=r"x\.yaml:2: unknown key 'learnig_rate'; did you mean 'learning_rate'"):
        parse_config(["--config", str(path)])


def test_unknown_flag_names_closest():
    with pytest.raises(ConfigError, match="did you mean 'temperature'"):
        parse_config(["--temprature", "0.1"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--loss", "flatnc"], "(?i)did you mean 'flatnce'"),
        (["--pooler", "clss"], "(?i)did you mean 'cls'"),
        (["--per_device_train_batch_size", "1"], "must be >= 2"),
        (["--mixed_precision", "fp8"], "mixed_precision"),
        (["--temperature", "0"], "temperature must be > 0"),
        # caught here, before the model loads: before, nan trained to NaN weights, a negative lr failed after loading
        # (adamw) or trained silently (lars), and logging_steps 0 divided by zero after step 1
        (["--temperature", "nan"], "temperature must be > 0, got nan"),
        (["--temperature", "inf"], "temperature must be > 0, got inf"),
        (["--learning_rate=-1e-3"], "learning_rate must be > 0"),
        (["--learning_rate", "-0.1", "--optim", "lars"], "learning_rate must be > 0"),
        (["--learning_rate", "nan"], "learning_rate must be > 0"),
        (["--logging_steps", "0"], "logging_steps must be >= 1, got 0"),
        (["--max_steps", "0"], "max_steps must be >= 1"),
        (["--num_train_epochs", "0"], "num_train_epochs must be > 0"),
        (["--save_steps", "-5"], "save_steps must be >= 0"),
        (["--eval_steps", "-1"], "eval_steps must be >= 0"),
        (["--warmup_ratio", "1.5"], "warmup_ratio must be >= 0 and <= 1"),
        (["--weight_decay", "-0.01"], "weight_decay must be >= 0"),
        (["--max_grad_norm", "nan"], "max_grad_norm must be >= 0"),
        (["--hard_negative_weight", "inf"], "hard_negative_weight must be a finite number"),
        (["--sogclr_gamma", "0"], "sogclr_gamma must be > 0 and <= 1"),
        (["--max_seq_length", "0"], "max_seq_length must be >= 1"),
        (["--max_train_samples", "1"], "max_train_samples must be >= 2"),
        (["--lr_scheduler_type", "cosine_warmup"], "lr_scheduler_type must be one of"),
        (["--negatives", "all"], "negatives must be one of cross_view, all_views"),
        (["--emc2_kernel", "scan"], "emc2_kernel must be one of paper, official_scan"),
        (["--dataset_sampling", "roundrobin"], "did you mean 'round_robin'"),
        # vision's own settings, checked with modality vision: these four parsed before
        (["--modality", "vision", "--norm_layer", "gruop"], "norm_layer must be one of batch, group, none, got 'gruop'"),
        (["--modality", "vision", "--image_size", "0"], "image_size must be >= 1, got 0"),
        (["--modality", "vision", "--projection_dim=-3"], "projection_dim must be >= 1, got -3"),
        (["--modality", "vision", "--projection_hidden_dim", "0"], "projection_hidden_dim must be >= 1, got 0"),
        (["--modality", "vision", "--color_jitter_strength", "nan"], "color_jitter_strength must be >= 0, got nan"),
        (["--modality", "vision", "--min_crop_scale", "nan"], "min_crop_scale must be > 0 and <= 1, got nan"),
    ],
)
def test_bad_values_are_rejected_before_loading_anything(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(argv)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found"):
        parse_config(["--config", "nope.yaml"])


def test_every_shipped_config_parses():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs, "configs/ is empty"
    for path in configs:
        parse_config(["--config", str(path)])


def _run_train(*argv):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *argv], capture_output=True, text=True, cwd=ROOT)


def test_train_py_reports_user_errors_in_one_line(tmp_path):
    result = _run_train("--train_file", str(tmp_path / "missing.txt"), "--model_name_or_path", str(tmp_path / "no-model"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: cannot load model")
    assert "Traceback" not in result.stderr


def test_train_py_reports_bad_data(tiny_bert, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xc3\x28 broken\n")
    result = _run_train("--train_file", str(bad), "--model_name_or_path", str(tiny_bert), "--output_dir", str(tmp_path / "r"))
    assert result.returncode == 2, result.stderr
    assert f"error: {bad}:2: not valid UTF-8" in result.stderr


def test_transformers_names_and_our_earlier_ones(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("resume_from: latest\n")  # an earlier yaml of ours still reads
    assert parse_config(["--config", str(path)]).training.resume_from_checkpoint == "latest"
    assert parse_config(["--resume_from", "latest"]).training.resume_from_checkpoint == "latest"
    assert parse_config(["--resume_from_checkpoint", "runs/x/checkpoint-500"]).training.resume_from_checkpoint == (
        "runs/x/checkpoint-500")  # fmt: skip
    steps = parse_config(["--eval_strategy", "steps", "--logging_steps", "7", "--save_strategy", "no"]).training
    assert (steps.eval_steps, steps.save_steps) == (7, 0)  # transformers: eval every logging_steps by default
    assert parse_config(["--eval_strategy", "no", "--eval_steps", "50"]).training.eval_steps == 0
    assert parse_config(["--eval_steps", "50"]).training.eval_steps == 50  # unset strategy: eval_steps decides
    with pytest.raises(ConfigError, match="eval_strategy must be one of no, steps, got 'epoch'"):
        parse_config(["--eval_strategy", "epoch"])


def test_the_training_arguments_class_does_not_shadow_transformers():
    import simcse_flat.config as config

    assert not hasattr(config, "TrainingArguments")


def test_help_groups_the_flags_by_what_they_configure_and_lists_each_once(capsys):
    import dataclasses
    import re

    from simcse_flat.config import ALL_ARGUMENTS

    with pytest.raises(SystemExit):
        parse_config(["--help"])
    text = capsys.readouterr().out
    titles = [cls._argument_group_name for cls in ALL_ARGUMENTS]
    assert [t.split()[0] for t in titles] == ["modality", "model", "vision", "data", "loss", "training"]
    sections = re.split(r"^(" + "|".join(map(re.escape, titles)) + r"):$", text, flags=re.M)
    assert sections[1::2] == titles  # in this order, each once
    for title, body, cls in zip(titles, sections[2::2], ALL_ARGUMENTS):
        listed = re.findall(r"^  (--\S+)", body, flags=re.M)
        assert listed == [f"--{f.name}" for f in dataclasses.fields(cls)], title  # once, underscores, no --no_X
    assert "--learning-rate" not in text and "LEARNING_RATE" not in text
    config = parse_config(["--learning-rate", "1e-4", "--no_mask_duplicates", "--resume_from", "latest"])
    assert (config.training.learning_rate, config.loss.mask_duplicates) == (1e-4, False)  # still accepted

def test_the_choices_are_the_modules_own_tuples(monkeypatch):
    """A choice a module adds is accepted by the checks at once: they read the module's tuple, not a copy."""
    import simcse_flat.data.batching as batching
    import simcse_flat.losses.emc2 as emc2
    import simcse_flat.optim as optim
    import simcse_flat.views as views

    for module, name, key in ((views, "NEGATIVES", "negatives"), (emc2, "KERNELS", "emc2_kernel"),
                              (batching, "SAMPLINGS", "dataset_sampling"), (optim, "OPTIMIZERS", "optim")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"{key} must be one of"):
            parse_config([f"--{key}", "brand_new"])
        monkeypatch.setattr(module, name, (*getattr(module, name), "brand_new"))
        parse_config([f"--{key}", "brand_new"])


def test_the_scheduler_names_are_transformers_own():
    """The checks name transformers' schedulers without importing the module that defines them (it imports peft,
    and through it torchvision): the copy must stay the enum's values."""
    from transformers import SchedulerType

    from simcse_flat.optim import LR_SCHEDULERS

    assert LR_SCHEDULERS == tuple(t.value for t in SchedulerType)
