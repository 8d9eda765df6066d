"""The README's "Use as a library" code runs as written (in a scratch folder that sees the repo's configs and data)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def readme_section_code(title: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.slow
def test_use_as_a_library_examples_run(minilm_path, tmp_path, monkeypatch, capsys):
    # the third block, SimcseFlatLoss in sentence-transformers' trainer, is run in test_sentence_transformers_loss.py
    blocks = readme_section_code("Use as a library")
    assert len(blocks) == 3 and "SimcseFlatLoss" in blocks[2]
    for name in ("configs", "data"):
        os.symlink(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)

    loss_example: dict = {}
    exec(blocks[0], loss_example)
    # FlatNCE = LSE of the negatives' logits - the positive's: below 0 when the two views agree
    assert torch.isfinite(loss_example["loss"]) and loss_example["loss"].item() < 0
    assert all(p.grad is not None for p in loss_example["encoder"].parameters() if p.requires_grad)
    assert capsys.readouterr().out.strip()  # the printed metrics

    training_example: dict = {}
    exec(blocks[1], training_example)
    assert training_example["result"].state.step == 20
    assert training_example["embeddings"].shape == (2, 384)
    assert (tmp_path / "runs" / "from_python" / "final" / "modules.json").exists()
