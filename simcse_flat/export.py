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

from .optim import describe_learning_rate
from .run_folder import write_folder_atomically

if TYPE_CHECKING:
    from .models.text import SentenceEncoder

# as the README's quickstart: the four flags are what `accelerate config` would otherwise supply (without them
# accelerate prints a warning block); --quiet leaves a user error its one line
REPRODUCE = ("accelerate launch --quiet --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no "
             "train.py --config training_config.yaml")


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
    license: str | None = None  # the model's licence, a hub identifier (apache-2.0, cc-by-sa-4.0): the publisher's

    def files(self) -> dict[str, str]:
        """``training_config.yaml`` (what "Reproduce" runs) and, with results, ``eval_results.json`` (the step, the
        split and the figures: what :meth:`measured` reads back)."""
        files = {"training_config.yaml": yaml.safe_dump(self.config, sort_keys=False)}
        if self.results is not None:
            files["eval_results.json"] = json.dumps({"step": self.steps, "split": self.split, **self.results})
        return files

    @staticmethod
    def measured(folder: str | Path) -> tuple[int | None, dict | None, str | None]:
        """``(step, results, split)`` a folder written by training or export says about itself: the step from
        ``simcse_flat.json`` (a checkpoint: ``trainer_state.json``), the figures from ``eval_results.json``."""
        folder = Path(folder)
        step, results, split = None, None, None
        for name in ("simcse_flat.json", "trainer_state.json"):
            if (folder / name).exists():
                step = json.loads((folder / name).read_text()).get("step", step)
        if (folder / "eval_results.json").exists():
            results = json.loads((folder / "eval_results.json").read_text())
            step = results.pop("step", step)
            split = results.pop("split", None)
        return step, results, split

    def section(self, rows: list[str], citation: bool = True) -> str:
        """The card's markdown about the run: a settings table (the modality's ``rows`` among them), the command
        that reproduces it, and (``citation``) the loss's citation."""
        config = self.config
        lines = ["## Training with simcse_flat", "", "| setting | value |", "|---|---|",
                 *(f"| {k} | `{v}` |" for k, v in self.loss.items()), *rows,
                 f"| batch size per device | {config.get('per_device_train_batch_size')} |",
                 f"| gradient accumulation | {config.get('gradient_accumulation_steps')} |",
                 f"| learning rate | {describe_learning_rate(config)} |",
                 f"| optimizer steps | {self.steps} |",
                 f"| data licence | {config.get('data_license') or 'see the data source'} |", "",
                 "### Reproduce", "", "```", REPRODUCE, "```", ""]  # fmt: skip
        if self.citation and citation:
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
    encoder: "SentenceEncoder",
    path: str | Path,
    overwrite: bool = False,
    summary: RunSummary | None = None,
    model_id: str | None = None,
) -> Path:
    """Write ``encoder`` with sentence-transformers' ``save`` at ``path``, atomically; with ``summary``, its model
    card (sentence-transformers' own, evaluation results in the metadata, plus the run's section) and files.
    The card's usage snippet loads ``model_id`` (the hub id it will be pushed to), else ``path`` (as a portable path).

    ``path`` must be new, empty, or (with ``overwrite``) an earlier export of ours: nothing else is ever replaced.
    """
    with encoder.published():
        metadata = {"pooler": encoder.pooler}  # as published: cls_before_pooler where the MLP was training only
    if summary is not None:
        metadata["step"] = summary.steps
    with write_folder_atomically(path, overwrite, metadata) as out:
        encoder.save(str(out), create_model_card=False)
        if summary is not None:
            model_id = model_id or _portable_path("model", str(path))
            (out / "README.md").write_text(text_model_card(encoder, summary, model_id))
            for name, text in summary.files().items():
                (out / name).write_text(text)
    return Path(path)


def text_model_card(encoder: "SentenceEncoder", summary: RunSummary, model_id: str) -> str:
    """sentence-transformers' model card for ``encoder`` with the run's facts, and simcse_flat's section after it.

    ``model_id`` is what the usage snippet loads: a hub id (``user/name``) or the folder. The licence line is the
    publisher's ``summary.license``; without one, the card says so and names the training data's licence."""
    from sentence_transformers.base.model_card import generate_model_card
    from sentence_transformers.sentence_transformer.model_card import SentenceTransformerModelCardData

    from .models.adapters import card_row

    config = summary.config
    card = SentenceTransformerModelCardData(
        language=config.get("language") or "en",
        license=summary.license,
        model_name=f"{Path(config.get('output_dir', 'model')).name} (simcse_flat, {summary.loss.get('loss')})",
        tags=["sentence-transformers", "sentence-similarity", "feature-extraction", "simcse_flat",
              str(summary.loss.get("loss", ""))],  # fmt: skip
        local_files_only=True,  # no hub look-ups while writing a card
        generate_widget_examples=False,
    )
    card.base_model = summary.base_model
    card.model_id = model_id  # set after construction: sentence-transformers keeps only "user/name" ids there
    data_license = config.get("data_license")
    card.train_datasets = [_dataset_entry(name, data_license, summary.loss)
                           for name in _as_list(config.get("train_file"))]  # fmt: skip
    if summary.citation:  # the template's BibTeX section, else an empty heading
        card.citations = {f"{summary.loss.get('loss', 'loss')} (simcse_flat)": summary.citation}
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
    if model_id.count("/") != 1 or Path(model_id).exists():  # a folder, not a hub id
        text = text.replace("# Download from the 🤗 Hub", "# Load the exported folder (or its hub id once pushed)")
    if not summary.license:
        text = text.replace("<!-- - **License:** Unknown -->", "- **License:** not chosen by the publisher "
                            f"(scripts/export_model.py --license); training data: {data_license or 'see its source'}")
    rows = [f"| pooler | `{config.get('pooler') or encoder.pooler}` (mlp_only_train: {config.get('mlp_only_train')}) |",
            f"| max sequence length (training) | {config.get('max_seq_length')} |",
            f"| training data | `{_names(config.get('train_file'))}` |", *card_row(config, encoder)]  # fmt: skip
    if config.get("model_type"):  # no base model: say what it started from
        rows.insert(0, f"| initialisation | from scratch: `{config['model_type']}` "
                       f"({config.get('config_overrides') or 'its default config'}), random weights from seed "
                       f"{config.get('seed')}, tokenizer `{config.get('tokenizer_name')}` |")  # fmt: skip
    return text.rstrip() + "\n\n" + summary.section(rows, citation=False)  # the citation is in the BibTeX section


def _dataset_entry(name: str, data_license: str | None, loss: dict) -> dict:
    """One training file as sentence-transformers' card template lists a training data set."""
    from .losses import loss_class

    cls = loss_class(loss.get("loss", "infonce"))
    columns = (["sentence (twice: two dropout views)"] if name.endswith(".txt") else ["sent0", "sent1", "hard_neg"]
               if name.endswith(".csv") else ["the data set's text columns"])  # fmt: skip
    return {"name": f"{name} (licence: {data_license})" if data_license else name, "columns": columns,
            "loss": {"fullname": f"{cls.__module__}.{cls.__name__}",
                     "config_code": f"```json\n{json.dumps(loss, indent=4)}\n```"}}  # fmt: skip


def _as_list(value) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)] if value else []


def _names(value) -> str:
    return ", ".join(_as_list(value)) or "None"


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
    from .models.text import ModelLoadError, SentenceEncoder, encoder_from_settings

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
    encoder = encoder_from_settings(config)  # the architecture the run built (pretrained or fresh), its weights below
    load_model_weights(encoder, path / "model.safetensors")  # as the checkpoint wrote it (LoRA: the adapters only)
    return encoder, config
