"""Publishing a trained model: what a run says about itself, and the text model's folder, card and hub upload.

A folder is written by the library that defines its format: the text model by sentence-transformers' own ``save``
and model card machinery (``SentenceTransformerModelCardData``: language, licence, datasets, base model, and the STS
results as evaluation results in the card's metadata, so the hub shows them); the vision model by
:meth:`simcse_flat.models.vision.VisionEncoder.save_pretrained`. Both go through
:func:`~simcse_flat.run_folder.write_folder_atomically` (never over files we did not write) and both carry the
run's :class:`RunSummary` the same way: ``training_config.yaml``, ``eval_results.json`` and a "Reproduce" section.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from .run_folder import write_folder_atomically

if TYPE_CHECKING:
    from .models.text import SentenceEncoder

REPRODUCE = "accelerate launch train.py --config training_config.yaml"


@dataclass
class RunSummary:
    """What a published model says about the run that made it."""

    config: dict  # the run's settings, portable (:func:`portable_config`)
    loss: dict = field(default_factory=dict)  # the loss's ``get_config_dict()``
    citation: str = ""
    steps: int | None = None
    results: dict | None = None  # the evaluator's figures at ``steps``
    split: str | None = None  # the split ``results`` were computed on
    base_model: str | None = None  # the hub id the run started from (:func:`hub_id_of`), None for a local folder

    def files(self) -> dict[str, str]:
        """``training_config.yaml`` (what "Reproduce" runs) and, with results, ``eval_results.json``."""
        files = {"training_config.yaml": yaml.safe_dump(self.config, sort_keys=False)}
        if self.results is not None:
            files["eval_results.json"] = json.dumps({"step": self.steps, **self.results})
        return files

    def section(self, rows: list[str]) -> str:
        """The card's markdown about the run: a settings table (the modality's ``rows`` among them), the command
        that reproduces it, and the loss's citation."""
        config = self.config
        lines = ["## Training with simcse_flat", "", "| setting | value |", "|---|---|",
                 *(f"| {k} | `{v}` |" for k, v in self.loss.items()), *rows,
                 f"| batch size per device | {config.get('per_device_train_batch_size')} |",
                 f"| gradient accumulation | {config.get('gradient_accumulation_steps')} |",
                 f"| learning rate | {config.get('learning_rate')} |",
                 f"| optimizer steps | {self.steps} |",
                 f"| data licence | {config.get('data_license') or 'see the data source'} |", "",
                 "### Reproduce", "", "```", REPRODUCE, "```", ""]  # fmt: skip
        if self.citation:
            lines += ["### Citation", "", "```bibtex", self.citation.strip(), "```", ""]
        return "\n".join(lines)


def hub_id_of(name: str | None) -> str | None:
    """The hub id a base model is known by (a pip-packaged model's, or the name itself); ``None`` for a folder."""
    from .models.text import PACKAGED_MODELS

    if not name or name in PACKAGED_MODELS:
        return PACKAGED_MODELS.get(name) if name else None
    if name.startswith(("package:", "/", ".", "~")) or os.path.exists(os.path.expanduser(name)):
        return None
    return name


def card_base_model(folder: str | Path) -> str | None:
    """The ``base_model`` an exported folder's card names (its config no longer holds the original path)."""
    from huggingface_hub import ModelCard

    card = Path(folder) / "README.md"
    return ModelCard.load(card).data.get("base_model") if card.exists() else None


PATH_SETTINGS = ("output_dir", "train_file", "eval_data_dir", "model_name_or_path", "tokenizer_name", "data_root")


def portable_config(config: dict) -> dict:
    """The run's settings as they travel with a published model: no absolute path of the training machine (one under
    the working folder becomes relative to it, any other keeps its last part; ``output_dir`` becomes
    ``runs/NAME``), and nothing about how that run was resumed."""
    portable = {**config, "resume_from_checkpoint": None, "overwrite_output_dir": False}
    if "ignore_rng_state" in portable:
        portable["ignore_rng_state"] = False
    for key in PATH_SETTINGS:
        value = portable.get(key)
        if isinstance(value, list):  # several train_file
            portable[key] = [_portable_path(key, v) for v in value]
        elif isinstance(value, str):
            portable[key] = _portable_path(key, value)
    return portable


def _portable_path(key: str, value: str) -> str:
    if not os.path.isabs(os.path.expanduser(value)):
        return value
    path = Path(value).expanduser()
    if key == "output_dir":
        return f"runs/{path.name}"
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else path.name


# ---- the text model -------------------------------------------------------------------------------------------------


def export_text_model(
    encoder: "SentenceEncoder", path: str | Path, overwrite: bool = False, summary: RunSummary | None = None
) -> Path:
    """Write ``encoder`` with sentence-transformers' ``save`` at ``path``, atomically; with ``summary``, its model
    card (sentence-transformers' own, evaluation results in the metadata, plus the run's section) and files.

    ``path`` must be new, empty, or (with ``overwrite``) an earlier export of ours: nothing else is ever replaced.
    """
    with encoder.published():
        metadata = {"pooler": encoder.pooler}  # as published: cls_before_pooler where the MLP was training only
    with write_folder_atomically(path, overwrite, metadata) as out:
        encoder.save(str(out), create_model_card=False)
        if summary is not None:
            (out / "README.md").write_text(text_model_card(encoder, summary))
            for name, text in summary.files().items():
                (out / name).write_text(text)
    return Path(path)


def text_model_card(encoder: "SentenceEncoder", summary: RunSummary) -> str:
    """sentence-transformers' model card for ``encoder`` with the run's facts, and simcse_flat's section after it."""
    from sentence_transformers.base.model_card import generate_model_card
    from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData

    from .models.adapters import card_row

    config = summary.config
    card = SentenceTransformerModelCardData(
        language=config.get("language") or "en",
        license=config.get("license"),
        model_name=f"{Path(config.get('output_dir', 'model')).name} (simcse_flat, {summary.loss.get('loss')})",
        tags=["sentence-transformers", "sentence-similarity", "feature-extraction", "simcse_flat",
              str(summary.loss.get("loss", ""))],  # fmt: skip
        local_files_only=True,  # no hub look-ups while writing a card
        generate_widget_examples=False,
    )
    card.base_model = summary.base_model
    for evaluator, metrics in _sts_evaluation_results(summary.results, summary.split):
        card.set_evaluation_metrics(evaluator, metrics, step=summary.steps or 0)
    kept = encoder.model_card_data
    card.register_model(encoder)
    encoder.model_card_data = card
    try:
        with encoder.published():  # the card describes the saved pipeline, not the training one
            text = generate_model_card(encoder)
    finally:
        encoder.model_card_data = kept
    rows = [f"| pooler | `{config.get('pooler') or encoder.pooler}` (mlp_only_train: {config.get('mlp_only_train')}) |",
            f"| max sequence length (training) | {config.get('max_seq_length')} |",
            f"| training data | `{_names(config.get('train_file'))}` |", *card_row(config)]  # fmt: skip
    if config.get("model_type"):  # no base model: say what it started from
        rows.insert(0, f"| initialisation | from scratch: `{config['model_type']}` "
                       f"({config.get('config_overrides') or 'its default config'}), random weights from seed "
                       f"{config.get('seed')}, tokenizer `{config.get('tokenizer_name')}` |")  # fmt: skip
    return text.rstrip() + "\n\n" + summary.section(rows)


def _names(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _sts_evaluation_results(results: dict | None, split: str | None):
    """Each STS task of ``results`` (:func:`simcse_flat.evaluation.evaluate_sts`) as sentence-transformers' trainer
    reports it: an ``EmbeddingSimilarityEvaluator`` named ``{task}-{split}`` and its ``spearman_cosine`` (0-1)."""
    from sentence_transformers.sentence_transformer.evaluation import EmbeddingSimilarityEvaluator

    tasks = [key.removesuffix("_n_pairs") for key in (results or {}) if key.endswith("_n_pairs")]
    for task in tasks:
        value = results.get(f"{task}_all_spearman", results.get(f"{task}_spearman"))
        name = f"{task}-{split}" if split else task
        evaluator = EmbeddingSimilarityEvaluator([], [], [], similarity_fn_names=["cosine"], name=name, write_csv=False)
        yield evaluator, {f"{name}_spearman_cosine": value / 100}


def push_to_hub(encoder: "SentenceEncoder", path: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an exported folder (card and files as written) with sentence-transformers' own ``push_to_hub``."""
    return encoder.push_to_hub(repo_id, private=private, local_model_path=str(path), exist_ok=True)


def load_trained_encoder(path: str | Path) -> tuple["SentenceEncoder", dict]:
    """A trained text encoder from a model folder (``final/``, ``best/``) or a checkpoint folder, and its run config.

    A checkpoint holds the training model's ``model.safetensors`` beside ``config.yaml``; the encoder is rebuilt
    from the config's base model and pooler, then loaded.
    """
    from .models.adapters import load_model_weights
    from .models.text import ModelLoadError, SentenceEncoder, load_encoder

    path = Path(path)
    if (path / "modules.json").exists():
        config_file = path / "training_config.yaml"
        config = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
        return SentenceEncoder.from_pretrained(str(path)), config
    if not ((path / "model.safetensors").exists() and (path / "config.yaml").exists()):
        raise ModelLoadError(f"{path}: neither a model folder (modules.json) nor a checkpoint (model.safetensors + config.yaml)")
    config = yaml.safe_load((path / "config.yaml").read_text())
    if config.get("model_type"):  # a fresh model: the weights the run drew from its seed (LoRA leaves them frozen)
        from accelerate.utils import set_seed

        set_seed(config.get("seed", 42))
    encoder = load_encoder(config)  # the architecture the run built (pretrained or fresh), its weights below
    load_model_weights(encoder, path / "model.safetensors")  # as the checkpoint wrote it (LoRA: the adapters only)
    return encoder, config
