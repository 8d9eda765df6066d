"""Model folders users can publish: sentence-transformers layout, a model card, optional push to the hub.

The folder is written by sentence-transformers' own modules (``Transformer`` → ``Pooling`` → ``Dense`` + tanh where
the MLP head is kept → ``Normalize`` where the source model had it; ``avg_first_last`` puts a
``WeightedLayerPooling`` with weight 1 on the first and last layers before a mean ``Pooling``), so
``SentenceTransformer(path)`` loads it and gives the trainer's embeddings; :meth:`SentenceEncoder.from_pretrained`
reads it back.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .run_folder import write_folder_atomically

if TYPE_CHECKING:
    from .models.text import SentenceEncoder

try:  # sentence-transformers >= 6 moved the modules; older releases only have the old path
    from sentence_transformers.sentence_transformer.modules import (
        Dense,
        Normalize,
        Pooling,
        Transformer,
        WeightedLayerPooling,
    )
except ImportError:  # pragma: no cover - depends on the installed release
    from sentence_transformers.models import Dense, Normalize, Pooling, Transformer, WeightedLayerPooling


def sentence_transformers_modules(encoder: "SentenceEncoder", backbone_dir: str) -> list[nn.Module]:
    """The sentence-transformers pipeline equivalent to ``encoder`` in inference mode."""
    dim = encoder.embedding_dim
    if encoder.pooler == "avg_first_last":
        # the backbone hands every layer on (output_hidden_states, saved in its config.json), then
        # WeightedLayerPooling averages layers 1.. with weight 1 on the first and the last (SimCSE's "first" is
        # the first transformer layer, not the embeddings), then a masked mean over tokens, as our pooler does
        transformer = Transformer(
            backbone_dir, max_seq_length=encoder.max_seq_length, config_kwargs={"output_hidden_states": True}
        )
        return [transformer, first_last_layer_pooling(dim, encoder.backbone.config.num_hidden_layers),
                Pooling(dim, pooling_mode="mean")]  # fmt: skip
    transformer = Transformer(backbone_dir, max_seq_length=encoder.max_seq_length)
    modules: list[nn.Module] = [transformer, Pooling(dim, pooling_mode="mean" if encoder.pooler == "mean" else "cls")]
    if encoder.pooler == "cls" and not encoder.mlp_only_train:
        dense = Dense(dim, dim, bias=True, activation_function=nn.Tanh())
        dense.linear.load_state_dict(encoder.mlp.dense.state_dict())
        modules.append(dense)
    if encoder.normalize:
        modules.append(Normalize())
    return modules


def first_last_layer_pooling(dim: int, num_layers: int) -> nn.Module:
    """``WeightedLayerPooling`` over layers ``1..num_layers`` giving ``(h_1 + h_L) / 2`` (a parameter, so it is saved)."""
    weights = torch.zeros(num_layers)
    weights[[0, -1]] = 1.0
    return WeightedLayerPooling(dim, num_hidden_layers=num_layers, layer_start=1, layer_weights=nn.Parameter(weights))


def save_sentence_transformers_folder(
    encoder: "SentenceEncoder",
    path: str | Path,
    model_card: str | None = None,
    training_config: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``encoder`` as a sentence-transformers folder at ``path``, atomically.

    ``path`` must be new, empty, or (with ``overwrite``) an earlier export of ours: nothing else is ever replaced
    (:func:`~simcse_flat.run_folder.write_folder_atomically`). ``training_config`` (the run's resolved yaml) is
    stored as ``training_config.yaml``: with it, ``accelerate launch train.py --config training_config.yaml``
    reproduces the run.
    """
    from sentence_transformers import SentenceTransformer

    metadata = {"pooler": encoder.pooler, "mlp_only_train": encoder.mlp_only_train}
    with write_folder_atomically(path, overwrite, metadata) as out, tempfile.TemporaryDirectory() as backbone_dir:
        encoder.backbone.save_pretrained(backbone_dir)
        encoder.tokenizer.save_pretrained(backbone_dir)
        model = SentenceTransformer(modules=sentence_transformers_modules(encoder, backbone_dir), device="cpu")
        model.save(str(out), create_model_card=False)
        if model_card is not None:
            (out / "README.md").write_text(model_card)
        if training_config is not None:
            (out / "training_config.yaml").write_text(training_config)
    return Path(path)


def model_card(
    *,
    base_model: str,
    loss_config: dict,
    config: dict,
    sts_table: str | None = None,
    command: str | None = None,
    train_data: str | None = None,
    data_license: str | None = None,
    steps: int | None = None,
    citation: str = "",
    modality: str = "text",
) -> str:
    """A README.md with the hub's metadata header: what was trained, on what, how, and how well."""
    text = modality == "text"
    header = {
        "library_name": "sentence-transformers" if text else "pytorch",
        "pipeline_tag": "sentence-similarity" if text else "image-feature-extraction",
        "tags": [*(["sentence-transformers", "sentence-similarity"] if text else ["simclr", "vision"]),
                 "simcse_flat", str(loss_config.get("loss", ""))],
    }  # fmt: skip
    from .models.text import PACKAGED_MODELS

    base_model = PACKAGED_MODELS.get(base_model, base_model)
    if text and base_model and not base_model.startswith(("package:", "/", ".")):
        header["base_model"] = base_model
    lines = ["---", *(_yaml_line(k, v) for k, v in header.items()), "---", ""]
    lines += [
        f"# {Path(config.get('output_dir', 'model')).name} (simcse_flat)",
        "",
        f"A{' sentence' if text else 'n image'}-embedding model trained with simcse_flat "
        f"using the **{loss_config.get('loss')}** contrastive loss.",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| base model | `{base_model}` |",
        *(f"| {k} | `{v}` |" for k, v in loss_config.items()),
        *(_text_rows(config) if text else _vision_rows(config)),
        f"| batch size per device | {config.get('per_device_train_batch_size')} |",
        f"| gradient accumulation | {config.get('gradient_accumulation_steps')} |",
        f"| learning rate | {config.get('learning_rate')} |",
        f"| optimizer steps | {steps} |",
        f"| training data | `{_names(train_data or (config.get('train_file') if text else config.get('vision_dataset')))}` |",
        f"| data licence | {data_license or 'see the data source'} |",
        "",
    ]
    if sts_table:
        title = "Evaluation (Spearman × 100, cosine)" if text else "Evaluation"
        lines += [f"## {title}", "", "```", sts_table.rstrip(), "```", ""]
    lines += ["## Usage", "", "```python", *(_TEXT_USAGE if text else _VISION_USAGE), "```", ""]
    if command:
        lines += ["## Reproduce", "", "```", command, "```", ""]
    if citation:
        lines += ["## Citation", "", "```bibtex", citation.strip(), "```", ""]
    return "\n".join(lines)


_TEXT_USAGE = [
    "from sentence_transformers import SentenceTransformer",
    "model = SentenceTransformer('PATH_OR_HUB_ID')",
    "embeddings = model.encode(['A man is playing a guitar.', 'Someone plays an instrument.'])",
]
_VISION_USAGE = [
    "from simcse_flat.vision import load_encoder",
    "encoder = load_encoder('PATH')  # pip install 'simcse_flat[vision]'",
    "features = encoder.encode(images)  # (N, D) representations, taken before the projection head",
]


def _text_rows(config: dict) -> list[str]:
    return [
        f"| pooler | `{config.get('pooler')}` (mlp_only_train: {config.get('mlp_only_train')}) |",
        f"| max sequence length (training) | {config.get('max_seq_length')} |",
    ]


def _vision_rows(config: dict) -> list[str]:
    return [
        f"| encoder | `{config.get('arch')}` (CIFAR stem: {config.get('cifar_stem')}) |",
        f"| image size | {config.get('image_size')} |",
        f"| optimizer | `{config.get('optim')}` (lr scaling: {config.get('lr_scaling')}) |",
    ]


def _names(value) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _yaml_line(key: str, value) -> str:
    if isinstance(value, list):
        return f"{key}:\n" + "\n".join(f"- {v}" for v in value)
    return f"{key}: {value}"


PATH_SETTINGS = ("output_dir", "train_file", "eval_data_dir", "model_name_or_path", "data_root")


def portable_config(config: dict) -> dict:
    """The run's settings as they travel with a published model: no absolute path of the training machine (one under
    the working folder becomes relative to it, any other keeps its last part; ``output_dir`` becomes
    ``runs/NAME``), and nothing about how that run was resumed."""
    portable = {**config, "resume_from": None, "overwrite_output_dir": False}
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


def push_to_hub(path: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Upload a saved folder with ``huggingface_hub`` (the one network call; tests replace it)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(path), repo_id=repo_id, commit_message="Upload simcse_flat model")
    return str(getattr(info, "commit_url", info))


def embeddings_match(encoder: "SentenceEncoder", path: str | Path, sentences: list[str]) -> float:
    """Largest absolute difference between ``encoder.encode`` and ``SentenceTransformer(path).encode``."""
    from sentence_transformers import SentenceTransformer

    ours = encoder.encode(sentences)
    theirs = torch.as_tensor(SentenceTransformer(str(path), device="cpu").encode(sentences, convert_to_numpy=True))
    return (ours - theirs).abs().max().item()


def load_trained_encoder(path: str | Path) -> tuple["SentenceEncoder", dict]:
    """A trained encoder from a model folder (``final/``, ``best/``) or a checkpoint folder, and its run config.

    A checkpoint (``checkpoints/checkpoint-N``) holds accelerate's ``model.safetensors`` (the whole encoder's state
    dict) beside ``config.yaml``; the encoder is rebuilt from the config's base model, then loaded.
    """
    import yaml
    from safetensors.torch import load_model

    from .models.text import ModelLoadError, SentenceEncoder

    path = Path(path)
    if (path / "modules.json").exists():
        config_file = path / "training_config.yaml"
        config = yaml.safe_load(config_file.read_text()) if config_file.exists() else {}
        return SentenceEncoder.from_pretrained(str(path)), config
    if not ((path / "model.safetensors").exists() and (path / "config.yaml").exists()):
        raise ModelLoadError(f"{path}: neither a model folder (modules.json) nor a checkpoint (model.safetensors + config.yaml)")
    config = yaml.safe_load((path / "config.yaml").read_text())
    encoder = SentenceEncoder.from_pretrained(
        config["model_name_or_path"],
        pooler=config["pooler"],
        mlp_only_train=config["mlp_only_train"],
    )
    load_model(encoder, str(path / "model.safetensors"))  # as the checkpoint wrote it (tied weights stored once)
    return encoder, config
