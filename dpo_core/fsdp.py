"""Fully sharded data parallel training (``train.strategy: fsdp``) on PyTorch's FSDP2 (``fully_shard``).

FSDP (Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel", arXiv 2304.11277;
ZeRO-3 in Rajbhandari et al. 2020, arXiv 1910.02054) keeps only ``1 / world`` of every parameter, gradient and
AdamW moment on each rank: before a block runs, its parameters are all-gathered; after its backward, the gradients
are reduce-scattered (averaged over the ranks, like DDP's all-reduce) and each rank updates its own shard.

Here every decoder layer is one ``fully_shard`` unit and the trainer's scorer module (the one whose ``forward``
runs the decoder and the LM head, see ``dpo_core.trainer._Scorer``) is the root unit, which holds the embeddings,
the final norm and the (possibly tied) LM head. Parameters become ``DTensor`` shards on a 1-D device mesh over all
ranks (gloo on CPU, NCCL on CUDA).

Checkpoints keep the single-process format, so any world size (and DDP or a single process) can resume them:
``full_model_tensors`` and ``full_optimizer_state`` gather the consolidated state with
``torch.distributed.checkpoint.state_dict`` (``full_state_dict=True``, ``cpu_offload=True``: a collective, every rank
must call it; only rank 0 receives the tensors), the optimizer state is re-keyed from parameter names to the integer
ids of ``optimizer.state_dict()``; ``load_full_state`` does the reverse on every rank (each rank reads the same
checkpoint and keeps its own shard).
"""

from __future__ import annotations

from typing import Any

import torch

from dpo_core.distributed import Dist
from dpo_core.models import DeviceSpec

__all__ = ["decoder_layers", "shard_for_training", "full_model_tensors", "full_optimizer_state", "load_full_state"]


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face ``*ForCausalLM`` (``get_decoder().layers``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if callable(getattr(base, "get_decoder", None)) else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(base).__name__} has no get_decoder().layers to shard; FSDP here needs a Hugging "
                         "Face decoder-only *ForCausalLM model")
    return list(layers)


def shard_for_training(root: torch.nn.Module, model: torch.nn.Module, spec: DeviceSpec, ctx: Dist) -> None:
    """``fully_shard`` each decoder layer of ``model``, then ``root`` (a module containing ``model`` whose forward
    runs it): parameters become ``DTensor`` shards over all ``ctx.world`` ranks, in place.

    Every rank must hold the same full weights before this call (unlike DDP, nothing is broadcast from rank 0; the
    ranks load the same model folder). On CUDA with bf16 autocast the gathered parameters are bf16 and gradients are
    reduced in float32 (``MixedPrecisionPolicy``); on CPU everything stays float32. Build the optimizer *after* this.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(spec.device.type, (ctx.world,))
    policy = MixedPrecisionPolicy()
    if spec.is_cuda and spec.autocast_dtype is torch.bfloat16:  # untested here: no GPU in the session that wrote it
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(root, mesh=mesh, mp_policy=policy)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """Every name of every parameter (tied ones have several) -> its first name in ``model.named_parameters()``."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(param), name)
    return out


def _optimizer_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The parameter name of each integer id of ``optimizer.state_dict()`` (ids count through the param groups)."""
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The consolidated weights on CPU, named like ``checkpoints.model_tensors`` (tied weights once); rank 0 only.

    A collective: every rank must call it; the other ranks get ``{}``.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from dpo_core.checkpoints import model_tensors

    names = list(model_tensors(model))  # names only: no communication
    full = get_model_state_dict(model, options=_full_options())
    if not full:  # not rank 0
        return {}
    return {n: full[n] for n in names}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The consolidated AdamW state on CPU, keyed by integer ids exactly like a single process's
    ``optimizer.state_dict()``; rank 0 only (a collective: every rank must call it, the others get ``{}``)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not full:
        return {}
    canonical = _canonical_names(model)
    index = {name: i for i, name in enumerate(_optimizer_names(model, optimizer))}
    state = {index[canonical[name]]: value for name, value in full["state"].items()}
    groups = []
    for group in full["param_groups"]:
        ids = list(dict.fromkeys(index[canonical[name]] for name in group["params"]))
        groups.append({**group, "params": ids})
    return {"state": state, "param_groups": groups}


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                    optimizer_state: dict[str, Any]) -> None:
    """Set consolidated ``tensors`` and an integer-keyed ``optimizer_state`` (any world size wrote them) into the
    sharded ``model`` and its ``optimizer``; every rank calls it with the same full state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    canonical = _canonical_names(model)
    aliased = {alias: tensors[name] for alias, name in canonical.items() if name in tensors}
    full = {**tensors, **aliased}  # tied weights under each of their names
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, full, options=options)
    names = _optimizer_names(model, optimizer)
    by_name = {
        "state": {names[int(i)]: value for i, value in optimizer_state["state"].items()},
        "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                         for group in optimizer_state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
