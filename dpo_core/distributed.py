"""Data-parallel training on PyTorch's own distributed stack: process group, rank helpers, sharding, exact reductions.

One process per device, started by ``torchrun`` (``python -m torch.distributed.run``), which sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. ``init_process_group`` joins the group with
gloo on CPU and NCCL on CUDA; the trainer then wraps the policy in ``DistributedDataParallel`` (``train.strategy:
ddp``, a full model copy per rank) or shards it with FSDP2's ``fully_shard`` (``fsdp``, see ``dpo_core.fsdp``).

The global batch does not depend on the world size: ``train.batch_size`` pairs per micro-batch and
``train.grad_accum`` micro-batches per optimizer step are *global* numbers. Every rank computes the same data order
and takes a strided shard ``micro_batch[rank::world]`` of each micro-batch, so 1 process and N processes train on
the same pairs at every step (same loss curve up to float summation order). When a micro-batch has fewer pairs than
ranks (the last, uneven batch of an epoch), the ranks left without a pair run a zero-weight pass over one pair
(DDP needs every rank in each gradient all-reduce, FSDP in each all-gather and reduce-scatter); it adds nothing to
the gradient and is counted in no metric.
Nothing is duplicated to even the shards out (unlike TRL issue 7045).

Metrics are reduced exactly: every rank sums its per-pair values (float64), the sums and pair counts are
all-reduced, and the means are sum / total pairs.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from dpo_core.models import DeviceSpec

__all__ = ["DistributedError", "Dist", "SINGLE", "resolve_strategy", "current", "init_process_group", "device_for",
           "destroy_process_group", "shard", "all_reduce_sums", "all_gather_objects", "broadcast_object",
           "distributed_reference_logps"]


class DistributedError(RuntimeError):
    """The distributed set-up is wrong (strategy, world size, missing torchrun environment); the message says what."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the group: ``rank`` of ``world`` (``world == 1``: no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


SINGLE = Dist()


def resolve_strategy(strategy: str, processes: int, *, lora: bool = False) -> str:
    """``auto`` -> ``single`` for one process, ``ddp`` otherwise; ``single`` with several processes and ``fsdp`` with
    one are errors (one process holds the whole model anyway: sharding over a 1-rank mesh would only add overhead),
    and so is ``fsdp`` with LoRA adapters (``lora``)."""
    if processes < 1:
        raise DistributedError(f"train.processes must be >= 1, got {processes}")
    if strategy == "auto":
        return "single" if processes == 1 else "ddp"
    if strategy == "single" and processes > 1:
        raise DistributedError(f"train.strategy='single' cannot run {processes} processes; use 'ddp' or 'auto'")
    if strategy not in ("single", "ddp", "fsdp"):
        raise DistributedError(f"unknown train.strategy {strategy!r}; expected auto, single, ddp or fsdp")
    if strategy == "fsdp" and processes == 1:
        raise DistributedError("train.strategy='fsdp' needs train.processes >= 2 (it shards the model over the "
                               "ranks); use 'single' or 'auto' for one process")
    if strategy == "fsdp" and lora:
        raise DistributedError("train.strategy='fsdp' does not support LoRA (model.lora); use 'ddp' (a frozen base "
                               "model with small adapters rarely needs sharding)")
    return strategy


def current() -> Dist:
    """The process group this process belongs to (``SINGLE`` when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_process_group(spec: DeviceSpec, timeout_s: float = 1800) -> Dist:
    """Join the group torchrun set up (env://): gloo on CPU, NCCL on CUDA (one GPU per local rank).

    A no-op returning ``SINGLE`` when ``WORLD_SIZE`` is unset or 1. On CUDA this also selects ``cuda:LOCAL_RANK``;
    use the returned ``device_for(spec)`` for the rank's device.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {missing} are not set; start the ranks with torchrun")
    if not dist.is_initialized():
        if spec.is_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend="nccl" if spec.is_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return current()


def device_for(spec: DeviceSpec, ctx: Dist) -> DeviceSpec:
    """``spec`` with the device this rank must use (``cuda:LOCAL_RANK`` on GPU; unchanged on CPU)."""
    if not spec.is_cuda:
        return spec
    return DeviceSpec(torch.device("cuda", ctx.local_rank), spec.dtype, spec.autocast_dtype, spec.attn_implementation)


def destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(indices: Sequence[int], ctx: Dist) -> list[int]:
    """This rank's strided share ``indices[rank::world]``: sizes differ by at most one, nothing is duplicated."""
    return list(indices[ctx.rank :: ctx.world])


def all_reduce_sums(values: Sequence[float], ctx: Dist, device: torch.device | str = "cpu") -> list[float]:
    """Element-wise sum of ``values`` over all ranks, in float64 (identity for a single process)."""
    if not ctx.enabled:
        return [float(v) for v in values]
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().tolist()


def all_gather_objects(obj: object, ctx: Dist) -> list[object]:
    """``[obj of rank 0, obj of rank 1, ...]`` (pickled through the process group: use only for our own tables)."""
    if not ctx.enabled:
        return [obj]
    out: list[object] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, ctx: Dist) -> object:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def distributed_reference_logps(
    model: torch.nn.Module,
    tokenized_df: pd.DataFrame,
    *,
    batch_size: int,
    spec: DeviceSpec,
    ctx: Dist,
    chunk_size: int = 1024,
    layout: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """``compute_reference_logps`` split across ranks: rank r scores rows ``r::world``; every rank gets the whole
    table, in the row order of ``tokenized_df`` (same columns and dtypes as the single-process table).

    ``progress(done, total)`` reports this rank's own rows (call it on rank 0 only for a rough global view).
    """
    from dpo_core.reference import REFERENCE_COLUMNS, compute_reference_logps

    positions = np.arange(len(tokenized_df))
    mine = positions[ctx.rank :: ctx.world]
    part = tokenized_df.iloc[mine]
    if len(part):
        table = compute_reference_logps(model, part, batch_size=batch_size, spec=spec, chunk_size=chunk_size, layout=layout,
                                        progress=progress)
    else:  # more ranks than rows
        table = pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
            REFERENCE_COLUMNS, ("object", "float64", "float64", "int64", "int64", "float64", "float64"), strict=True)})
    table = table.assign(_position=mine)
    gathered = all_gather_objects(table, ctx)
    whole = pd.concat(gathered, ignore_index=True).sort_values("_position", kind="stable")
    if len(whole) != len(tokenized_df) or not np.array_equal(whole["_position"].to_numpy(), positions):
        raise DistributedError(f"gathered reference table has {len(whole)} rows for {len(tokenized_df)} pairs")
    return whole.drop(columns="_position").reset_index(drop=True)[REFERENCE_COLUMNS]
