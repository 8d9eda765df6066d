"""Sharded training (FSDP2) through accelerate: what the loop needs besides ``accelerator.prepare``.

``accelerate launch --config_file configs/accelerate/fsdp.yaml train.py --config ...`` makes accelerate shard the
encoder with ``torch.distributed.fsdp.fully_shard`` (``fsdp_version: 2``): each transformer layer is one unit, the
rest of the model the root unit, and every process holds ``1/W`` of every weight, gradient and optimizer moment.
The loop itself is unchanged (the gather with gradient, GradCache, every loss); three things are not, and live here:

* **The wrap unit.** accelerate's ``TRANSFORMER_BASED_WRAP`` wraps the classes named by the model's
  ``_no_split_modules``, which a ``SentenceTransformer`` says are none: ``SentenceEncoder`` answers with its
  transformers model's (``Qwen2DecoderLayer``, ``BertLayer``, ...), so one accelerate config fits every encoder.
* **Checkpoints.** Not accelerate's ``save_state`` (its distributed-checkpoint ``.metadata`` is pickled): the full
  weights and optimizer state are gathered onto the main process (``get_model_state_dict`` /
  ``get_optimizer_state_dict`` with ``full_state_dict``, ``cpu_offload``) and written in the DDP checkpoint's files
  and layout (the optimizer's moments by parameter position, as ``optimizer.state_dict()``); on resume the main
  process reads them, and ``set_model_state_dict`` / ``set_optimizer_state_dict`` (``broadcast_from_rank0``) hand
  every process its shard.
* **Evaluation and export.** The evaluators and sentence-transformers' ``save`` are one-process code, and a sharded
  model cannot run a forward pass on one process alone. So every process takes part in gathering the weights, and
  the main process evaluates and saves a plain copy of the model holding them (:meth:`ShardedModel.gather`).

:func:`check_sharding` refuses, in one line and before anything loads, what is not supported under FSDP.
"""

from __future__ import annotations

import copy
import os
from typing import Callable

import torch
from torch import nn

from .distributed import on_main
from .errors import CheckpointError, ConfigError


def fsdp_requested() -> bool:
    """Whether the accelerate config (``distributed_type: FSDP``, or ``--use_fsdp``) asked for sharding."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_sharding(config, accelerator) -> None:
    """A combination that cannot work under FSDP fails here, in one line, before the model loads."""
    if not fsdp_requested() and not is_sharded(accelerator):
        return
    if not is_sharded(accelerator):
        raise ConfigError(
            f"the accelerate config asks for FSDP, but accelerate did not shard (distributed type "
            f"{accelerator.distributed_type.value}, {accelerator.num_processes} process(es)): it shards on GPUs only; "
            "on CPUs launch with --multi_gpu instead (DDP on gloo)"
        )
    plugin = accelerator.state.fsdp_plugin
    refusals = [
        (plugin.fsdp_version != 2, f"fsdp_version: {plugin.fsdp_version} in the accelerate config: simcse_flat shards "
                                   "with FSDP2 only (fsdp_version: 2)"),
        (not config.modality.shardable, f"modality: {config.modality.name} with FSDP: sharding is offered for text "
                                        f"encoders (the transformer layer is the unit); train {config.modality.name} "
                                        "models with DDP"),
        (config.loss.loss == "emc2" and config.loss.emc2_estimator == "stored",
         "emc2_estimator: stored with FSDP: it encodes a different number of samples on each process, and a sharded "
         "forward pass needs every process; use emc2_estimator: refresh"),
        (config.training.mixed_precision == "fp16", "mixed_precision: fp16 with FSDP is not supported (its sharded "
                                                    "gradient scaler is untested here); use bf16"),
        (bool(plugin.activation_checkpointing), "fsdp_activation_checkpointing: true in the accelerate config: use "
                                                "gradient_checkpointing: true in the run's config instead"),
        (bool(plugin.cpu_ram_efficient_loading), "fsdp_cpu_ram_efficient_loading: true in the accelerate config is "
                                                 "not supported: set it to false"),
    ]
    for refused, message in refusals:
        if refused:
            raise ConfigError(message)


def _full_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def _plain_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


class ShardedModel:
    """The main process's way to the full weights of a model that accelerate shards: built before ``prepare``, it
    keeps a copy of the model's structure (its weights on the ``meta`` device: no memory), into which
    :meth:`gather` loads the gathered weights; :meth:`optimizer_state` and :meth:`load` translate optimizer states
    between FSDP's keys (parameter names) and ``optimizer.state_dict()``'s (positions), the DDP checkpoint's."""

    def __init__(self, accelerator, encoder: nn.Module) -> None:
        from .models.adapters import frozen_fingerprint, has_adapters

        self.accelerator = accelerator
        if has_adapters(encoder):
            frozen_fingerprint(encoder)  # cached on the model (and so on the copies): computed while unsharded
        self.template = None
        self._gathered: tuple[int, dict] | None = None  # (step, the full weights gathered at it): see gather()
        if accelerator.is_main_process:
            meta = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                    for p in encoder.parameters()}  # fmt: skip
            self.template = copy.deepcopy(encoder, memo=meta)  # buffers and tokenizer copied, weights not

    def gather(self, model: nn.Module, step: int | None = None) -> nn.Module | None:
        """Every process: gather the full weights; the main process gets a plain (unsharded) copy of the model
        holding them, on the CPU, in ``model``'s training mode; the others ``None``.

        ``step``: the optimizer step the weights are at. Another call at the same step reuses these gathered
        weights instead of gathering again (a step that evaluates, checkpoints and exports ``final/`` gathers
        once), until :meth:`release` or a call at another step frees them."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        if step is None or self._gathered is None or self._gathered[0] != step:
            self.release()  # never two full copies at once
            state = get_model_state_dict(model, options=_full_options(cpu_offload=True))
            if self.accelerator.is_main_process:
                # a gathered tensor can be a view into a padded all-gather buffer: its own storage, as safetensors
                # wants
                state = {k: v if v.untyped_storage().nbytes() == v.nbytes else v.clone() for k, v in state.items()}
            self._gathered = (step, state) if step is not None else None  # every process: all skip, or none
        else:
            state = self._gathered[1]
        if not self.accelerator.is_main_process:
            return None
        plain = copy.deepcopy(self.template)
        plain.load_state_dict(state, strict=True, assign=True)
        return plain.train(model.training)

    def release(self) -> None:
        """Free the weights :meth:`gather` keeps for its step (the main process's full copy, in CPU memory)."""
        self._gathered = None

    def optimizer_state(self, model: nn.Module, optimizer) -> dict | None:
        """Every process: the full optimizer state, on the main process as ``optimizer.state_dict()`` of the
        unsharded model lays it out (parameters by position); ``None`` on the others."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(model, _plain_optimizer(optimizer), options=_full_options(cpu_offload=True))
        if not self.accelerator.is_main_process:
            return None
        groups = state["param_groups"]
        position = {name: i for i, name in enumerate(name for group in groups for name in group["params"])}
        by_position = sorted(((position[name], value) for name, value in state["state"].items()), key=lambda kv: kv[0])
        return {"state": dict(by_position),
                "param_groups": [{**group, "params": [position[name] for name in group["params"]]} for group in groups]}

    def load(self, model: nn.Module, optimizer, load_weights: Callable[[nn.Module], None],
             read_optimizer: Callable[[], dict]) -> None:  # fmt: skip
        """Every process: the main process loads the checkpoint's weights (``load_weights`` into a plain copy of
        the model, so LoRA's adapter-only files and their checks work as without FSDP) and optimizer state
        (``read_optimizer``: ``optimizer.state_dict()``'s layout); every process then gets its shard of both. An
        error on the main process is raised on every process."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        plain = self.gather(model)  # the current weights: an adapter file holds only part of them
        loaded = {"weights": {}, "optimizer": {}}  # filled on the main process; broadcast_from_rank0 sends the rest

        def read() -> None:  # returns nothing: on_main would broadcast a result, and these are the full state
            load_weights(plain)
            loaded["weights"] = plain.state_dict()
            loaded["optimizer"] = self._by_name(model, optimizer, read_optimizer())

        on_main(self.accelerator, read)
        set_model_state_dict(model, loaded["weights"], options=_full_options(broadcast_from_rank0=True))
        set_optimizer_state_dict(model, _plain_optimizer(optimizer), loaded["optimizer"],
                                 options=_full_options(broadcast_from_rank0=True))  # fmt: skip

    @staticmethod
    def _by_name(model: nn.Module, optimizer, state: dict) -> dict:
        """``optimizer.state_dict()``'s layout (parameters by position) keyed by parameter name, as FSDP's
        ``set_optimizer_state_dict`` takes it."""
        names_of = {id(p): name for name, p in model.named_parameters()}
        names = [names_of[id(p)] for group in _plain_optimizer(optimizer).param_groups for p in group["params"]]
        try:
            if len(state["param_groups"]) != len(_plain_optimizer(optimizer).param_groups):
                raise ValueError(f"{len(state['param_groups'])} parameter groups, the run has "
                                 f"{len(_plain_optimizer(optimizer).param_groups)}")  # fmt: skip
            groups = [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]
            return {"state": {names[i]: value for i, value in state["state"].items()}, "param_groups": groups}
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise CheckpointError(f"the optimizer state does not fit this run ({err})") from None
