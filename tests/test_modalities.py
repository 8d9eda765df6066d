"""The modality registry: one object a modality, the only place that asks which one a run is, no import circle."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from simcse_flat.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "simcse_flat"
REGISTRY = PACKAGE / "modalities"


def test_parsing_a_text_yaml_imports_neither_torchvision_nor_sentence_transformers():
    code = ("import sys\nfrom simcse_flat.config import parse_config\n"
            "parse_config(['--config', 'configs/quickstart.yaml'])\n"
            "print(sorted(m for m in ('torchvision', 'sentence_transformers', 'peft') if m in sys.modules))"
            )  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# a comparison with a modality's name: `== "vision"`, `"text" !=`, `in ("text", "vision")`, `modality ==`
_ASKS_WHICH = re.compile(
    r"""(==|!=)\s*["'](text|vision)["']|["'](text|vision)["']\s*(==|!=)|\bin\s*[(\[{]\s*["'](text|vision)["']"""
    r"""|modality\b[\w.]*\s*(==|!=|\b(not\s+)?in\b)"""
)


def _python_files_outside_the_registry() -> list[Path]:
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "scripts").glob("*.py"), ROOT / "train.py", ROOT / "evaluate_sts.py"]
    return [path for path in files if REGISTRY not in path.parents]


def test_no_module_outside_the_registry_asks_which_modality_a_run_is():
    asking = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _python_files_outside_the_registry()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if _ASKS_WHICH.search(line.split("#", 1)[0])
    ]
    assert asking == []


def test_the_pattern_finds_each_way_of_asking():
    for line in ('if config.model.modality == "vision":', "if _check_modality(config) != 'vision':",
                 'if "text" == name:', 'if name in ("text", "vision"):', "if modality not in MODALITIES:",
                 "return config.modality == VISION"):  # fmt: skip
        assert _ASKS_WHICH.search(line), line
    for line in ('modality = "vision"', "config.modality.build(config)", 'help="text | vision"'):
        assert not _ASKS_WHICH.search(line), line


def _module_level_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports when it is imported (not inside a function, not under TYPE_CHECKING)."""
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + getattr(node, "finalbody", []) +
                      [n for h in getattr(node, "handlers", []) for n in h.body])  # fmt: skip
            elif isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level else ""
                name = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
                found.add(name)
                found.update(f"{name}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    # importing a.b imports a first, unless a is the importing module's own package (being imported already)
    parents = {".".join(name.split(".")[:i]) for name in found for i in range(1, name.count(".") + 1)}
    own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    return {name for name in found | parents if name.startswith("simcse_flat") and name not in own}


def test_the_package_has_no_import_circle():
    """Each module's import-time imports of the package form no cycle (config once imported config_checks, which
    imported config, which imported the modalities, which imported vision, which imported config)."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}  # fmt: skip
    graph = {name: {m for m in _module_level_imports(path) if m in modules and m != name}
             for name, path in modules.items()}  # fmt: skip
    done, path = set(), []

    def walk(name):
        if name in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        path.append(name)
        for target in sorted(graph[name]):
            walk(target)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        walk(name)
    assert "noqa: E402" not in (PACKAGE / "config.py").read_text()


def test_a_candidate_id_and_a_chain_state_decode_to_one_sample_request():
    """Sample ``j``'s positive and hard negative: candidate ids ``j`` and ``-1 - j``, chain states ``j`` and
    ``m + j``, asked of the modality as (id ``j``, view 1 or 2)."""
    import torch

    from simcse_flat.samples import HARD_NEGATIVE, POSITIVE, SampleRequest, chain_states, hard_negative_ids

    ids, m = torch.tensor([0, 3, 4]), 5
    states = chain_states(torch.cat([ids, hard_negative_ids(ids)]), m)
    assert states.tolist() == [0, 3, 4, 5, 8, 9]
    request = SampleRequest.of_states(states, m)
    assert request.ids.tolist() == [0, 3, 4, 0, 3, 4]
    assert request.view.tolist() == [POSITIVE] * 3 + [HARD_NEGATIVE] * 3


def test_the_sample_encoder_encodes_each_requested_view(tiny_bert):
    """The text parts' sample encoder: a triple's positive is its ``sent1``, its hard negative its ``hard_neg``,
    an unsupervised sentence's positive the sentence itself, each encoded as the loop's forward encodes it."""
    import torch
    from transformers import AutoTokenizer

    from simcse_flat.data.text import ContrastiveCollator
    from simcse_flat.modalities import TrainingParts
    from simcse_flat.samples import HARD_NEGATIVE, POSITIVE, SampleRequest

    rows = [{"sent0": "a man", "sent1": "the man", "hard_neg": "no dog", "idx": 0}, {"text": "a cat", "idx": 1}]
    collator = ContrastiveCollator(AutoTokenizer.from_pretrained(str(tiny_bert)))
    seen = []

    def encode(batch):
        seen.append(collator.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True))
        return torch.zeros(len(batch["input_ids"]), 2)

    parts = TrainingParts(model=None, dataset=rows, collate_fn=collator, collate_view=collator.one_view, description="")
    request = SampleRequest(torch.tensor([0, 0, 1]), torch.tensor([POSITIVE, HARD_NEGATIVE, POSITIVE]))
    assert parts.sample_encoder(encode, "cpu")(request).shape == (3, 2)
    assert seen == [["the man", "no dog", "a cat"]]


@pytest.mark.parametrize("argv, message", [
    (["--arch", "resnet50"], "arch: 'resnet50' is a vision setting, and this run's modality is text: set modality: "
                             "vision, or leave arch out"),
    (["--modality", "vision", "--max_seq_length", "64"], "max_seq_length: 64 is a text setting, and this run's "
                                                         "modality is vision: set modality: text, or leave "
                                                         "max_seq_length out"),
    (["--modality", "vision", "--lora_target_modules", "q_proj"], "lora_target_modules: ['q_proj'] is a text setting"),
])  # fmt: skip
def test_another_modalitys_setting_away_from_its_default_is_refused(argv, message):
    # a run would ignore it: a text run given arch: resnet50 trains the text encoder without a word
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        parse_config(argv)
    parse_config(["--arch", "resnet18", "--max_seq_length", "64"])  # at its default (an earlier config.yaml's): read
