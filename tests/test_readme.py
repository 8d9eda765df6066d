"""Every code block of README.md runs or checks as written: each ```python block is executed (in a scratch folder
that sees the repo's configs and data), the ```yaml block is read as a config, each ```bash command names files
that exist and flags its script accepts, and the Layout block names files that exist. The plain block after the
quickstart (the run folder it writes) is the quickstart's output, checked by the training tests."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
LAUNCHER_FLAGS_WITH_VALUE = {"--num_processes", "--num_machines", "--mixed_precision", "--dynamo_backend",
                             "--main_process_port", "--config_file"}  # fmt: skip


def fenced_blocks(text: str = README) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block, in order (``""`` for a plain one)."""
    blocks, language, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if language is None:
                language, body = line[3:].strip(), []
            else:
                blocks.append((language, "\n".join(body) + "\n"))
                language = None
        elif language is not None:
            body.append(line)
    assert language is None, "an unclosed block"
    return blocks


def code_blocks(language: str, text: str = README) -> list[str]:
    return [body for lang, body in fenced_blocks(text) if lang == language]


def readme_section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def bash_commands() -> list[list[str]]:
    commands = []
    for block in code_blocks("bash"):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()  # a comment after the command
            if line and not line.startswith("#"):
                commands.append(shlex.split(line))
    return commands


QUICKSTART = next(c for c in bash_commands() if c[:2] == ["accelerate", "launch"] and "configs/quickstart.yaml" in c)


def test_the_readme_has_the_blocks_this_file_checks():
    languages = [language for language, _ in fenced_blocks()]
    assert sorted(set(languages)) == ["", "bash", "python", "yaml"]  # no other kind goes unchecked
    assert languages.count("python") == 4 and "SimcseFlatLoss" in code_blocks("python")[3]
    assert languages.count("yaml") == 1 and languages.count("") == 2 and len(bash_commands()) >= 15


def _script_and_args(command: list[str]) -> tuple[str, list[str]] | None:
    """The script a command line runs and its arguments (up to a literal ``...``); ``None`` for pip / pytest."""
    while command and re.match(r"^[A-Z_]+=", command[0]):  # ACCELERATE_USE_CPU=1 ...
        command = command[1:]
    if command[0] in ("pip", "pytest"):
        return None
    if command[:2] == ["accelerate", "launch"]:
        rest = command[2:]
        while rest and rest[0].startswith("-"):
            rest = rest[2:] if rest[0] in LAUNCHER_FLAGS_WITH_VALUE else rest[1:]
        command = ["python", *rest]
    entry_points = {"simcse-flat-train": "train.py", "simcse-flat-evaluate": "evaluate_sts.py"}
    if command[0] in entry_points:
        command = ["python", entry_points[command[0]], *command[1:]]
    assert command[0] == "python", command
    args = command[2:]
    return command[1], args[: args.index("...")] if "..." in args else args


@pytest.mark.parametrize("command", bash_commands(), ids=lambda c: " ".join(c)[:70])
def test_each_bash_command_names_existing_files_and_flags_its_script_takes(command, monkeypatch):
    from simcse_flat.commands import parse_evaluate_sts_args
    from simcse_flat.config import parse_config

    monkeypatch.chdir(ROOT)
    if command[:2] == ["pip", "install"]:
        extras = re.findall(r"\.\[(\w+)\]", " ".join(command))
        pyproject = (ROOT / "pyproject.toml").read_text()
        assert all(re.search(rf"^{extra} = \[", pyproject, flags=re.M) for extra in extras), command
        return
    found = _script_and_args(command)
    if found is None:
        return
    script, args = found
    assert (ROOT / script).is_file(), script
    for value in args:
        if re.match(r"^(configs|data|scripts)/", value):
            assert (ROOT / value).exists(), value
    if script == "train.py":
        parse_config(args)
    elif script == "evaluate_sts.py":
        parse_evaluate_sts_args(args)
    else:
        source = (ROOT / script).read_text()
        for flag in (a.split("=", 1)[0] for a in args if a.startswith("--")):
            assert f'"{flag}"' in source, (script, flag)


def test_the_yaml_block_is_a_valid_config(tmp_path):
    from simcse_flat.config import load_yaml

    (block,) = code_blocks("yaml")
    (tmp_path / "x.yaml").write_text(block)
    assert set(load_yaml(tmp_path / "x.yaml")) == {"train_file", "dataset_sampling", "train_file_weights"}


def test_the_layout_names_files_that_exist():
    (layout,) = [b for b in code_blocks("", readme_section("Layout")) if "simcse_flat/" in b]
    names = re.findall(r"[\w/]+\.py\b|\b(?:simcse_flat|scripts|docs)/[\w/]*", layout)
    assert len(names) > 25
    for name in names:
        assert any((ROOT / where / name).exists() for where in ("", "scripts", "simcse_flat")), name


def test_the_exported_reproduce_line_is_the_quickstarts():
    from simcse_flat.export import REPRODUCE

    assert REPRODUCE == shlex.join(QUICKSTART).replace("configs/quickstart.yaml", "training_config.yaml")


@pytest.mark.slow
def test_every_python_block_runs_as_written(minilm_path, tmp_path, monkeypatch, capsys):
    from simcse_flat.export import export_text_model
    from simcse_flat.models.text import SentenceEncoder

    quickstart, losses, training, st_trainer = code_blocks("python")
    for name in ("configs", "data"):
        os.symlink(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)

    # the quickstart's best/ is the packaged MiniLM here (the quickstart itself is test_training_runs' business)
    export_text_model(SentenceEncoder.from_pretrained(minilm_path), "runs/quickstart/best")
    namespace: dict = {}
    exec(quickstart, namespace)
    assert namespace["model"].encode(["a sentence"]).shape == (1, 384)

    namespace = {}
    exec(losses, namespace)
    # FlatNCE = LSE of the negatives' logits - the positive's: below 0 when the two views agree
    assert torch.isfinite(namespace["loss"]) and namespace["loss"].item() < 0
    assert all(p.grad is not None for p in namespace["encoder"].parameters() if p.requires_grad)
    assert capsys.readouterr().out.strip()  # the printed metrics

    namespace = {}
    exec(training, namespace)
    assert namespace["result"].state.step == 4
    assert namespace["embeddings"].shape == (2, 384)
    assert (tmp_path / "runs" / "from_python" / "final" / "modules.json").exists()

    namespace = {}
    exec(st_trainer, namespace)
    assert namespace["trainer"].state.global_step == 2


@pytest.mark.slow
def test_a_mistyped_flag_in_the_quickstart_command_prints_one_line(tmp_path):
    """The README's quickstart command, with ``--learning_rat 1e-4`` for its config: one line on stderr, nothing
    else; under the launcher accelerate's status (1), with ``python train.py`` ours (2)."""
    line = "error: command line: unknown key 'learning_rat'; did you mean 'learning_rate'?"
    launcher_flags = QUICKSTART[2 : QUICKSTART.index("train.py")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch", *launcher_flags]
    launched = subprocess.run([*launcher, "train.py", "--learning_rat", "1e-4"], cwd=ROOT, env=env,
                              capture_output=True, text=True)  # fmt: skip
    direct = subprocess.run([sys.executable, "train.py", "--learning_rat", "1e-4"], cwd=ROOT, env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert (launched.returncode, launched.stderr.splitlines(), launched.stdout) == (1, [line], "")
    assert (direct.returncode, direct.stderr.splitlines(), direct.stdout) == (2, [line], "")
