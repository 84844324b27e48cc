"""The per-rank entry point that torchrun starts: ``python -m dpo_core.train_main JOB.json``.

Two kinds of job: ``TrainJob`` (DPO training) and ``ReferenceJob`` (the reference log-prob precompute, split across
the ranks and gathered into one table by ``dpo_core.distributed.distributed_reference_logps``).

A job is a small JSON file the train task writes (``TrainJob``): the model folder and its ``ModelConfig``, the
tokenized pairs (Parquet), the reference table (Parquet, optional), the ``TrainConfig`` and the output folder.
Every rank loads the model and data itself, joins the process group (gloo on CPU, NCCL on CUDA) and calls
``dpo_core.trainer.train``; rank 0 prints one ``DPO_PROGRESS {json}`` line per optimizer step (the launcher turns
them into Prefect progress) and finally writes ``out_dir/train_main_result.json`` (a reference job: next to its
table).

Run with one process (no torchrun) it trains in this process, exactly like calling ``train`` directly.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Literal, Union

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from dpo_core.config import ModelConfig, TrainConfig
from dpo_core.distributed import Dist, destroy_process_group, device_for, distributed_reference_logps
from dpo_core.distributed import init_process_group, resolve_strategy
from dpo_core.fileio import atomic_file
from dpo_core.models import load_model, load_tokenizer, pick_device
from dpo_core.reference import read_reference_table, write_reference_table
from dpo_core.trainer import TrainingInterrupted, train

__all__ = ["TrainJob", "ReferenceJob", "RESULT_FILE", "PROGRESS_PREFIX", "run_job", "run_reference_job",
           "read_job", "read_result", "main"]

RESULT_FILE = "train_main_result.json"
PROGRESS_PREFIX = "DPO_PROGRESS "
# Fault injection for the launcher tests: rank DPO_FAIL_RANK raises after optimizer step DPO_FAIL_AFTER_STEP.
FAIL_AFTER_STEP_ENV = "DPO_FAIL_AFTER_STEP"
FAIL_RANK_ENV = "DPO_FAIL_RANK"


class InjectedRankFailure(RuntimeError):
    """Raised by the fault-injection hook; only tests set DPO_FAIL_AFTER_STEP / DPO_FAIL_RANK."""


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=1))
        return path


class TrainJob(_Job):
    """What one training run needs, as the train task writes it (paths absolute)."""

    kind: Literal["train"] = "train"
    model_dir: str
    model: ModelConfig
    tokenized: str  # Parquet of tokenize_pairs output
    split: str | None = "train"  # rows to train on (None: every row)
    validation_split: str | None = None  # rows scored on validation during training (none when absent)
    reference: str | None = None  # Parquet reference table; None: live / initial-policy reference (see trainer)
    ref_model_dir: str | None = None  # a frozen live reference model folder (train.precompute_reference=false)
    train: TrainConfig
    out_dir: str
    stop_after_steps: int | None = None

    @property
    def processes(self) -> int:
        return self.train.processes

    @property
    def result_dir(self) -> Path:
        return Path(self.out_dir)


class ReferenceJob(_Job):
    """The reference precompute over the rows of ``tokenized`` (those of ``splits``; None: every row), written to
    ``out_file`` (Parquet)."""

    kind: Literal["reference"] = "reference"
    model_dir: str
    model: ModelConfig  # the reference model's config (no LoRA: the reference is the base model)
    tokenized: str
    out_file: str
    batch_size: int = Field(8, gt=0)
    chunk_size: int = Field(1024, gt=0)
    layout: Literal["auto", "padded", "packed", "shared_prompt"] = "auto"
    processes: int = Field(1, gt=0)
    splits: list[str] | None = None

    @property
    def result_dir(self) -> Path:
        return Path(self.out_file).parent


class _AnyJob(BaseModel):
    job: Union[TrainJob, ReferenceJob] = Field(discriminator="kind")


def read_job(path: Path) -> TrainJob | ReferenceJob:
    """A job file written by ``TrainJob.write`` / ``ReferenceJob.write``; a clear error if missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"job file {path} does not exist")
    return _AnyJob.model_validate_json('{"job": ' + path.read_text() + "}").job


def _progress_printer(ctx: Dist):
    fail_after = int(os.environ.get(FAIL_AFTER_STEP_ENV, "0") or 0)
    fail_rank = int(os.environ.get(FAIL_RANK_ENV, "0") or 0)

    def on_step(metrics: dict[str, Any]) -> None:
        if ctx.is_main:
            print(PROGRESS_PREFIX + json.dumps(metrics, default=float), flush=True)
        if fail_after and int(metrics["step"]) >= fail_after and ctx.rank == fail_rank:
            raise InjectedRankFailure(f"injected failure on rank {ctx.rank} after step {metrics['step']}")

    return on_step


def run_job(job: TrainJob) -> dict[str, Any]:
    """Train as ``job`` says in this process (one rank of a torchrun group, or alone); returns the result record.

    The record (also written by rank 0 to ``out_dir/train_main_result.json``) has ``status`` ("complete" or
    "interrupted"), ``steps``, ``resumed_from_step``, ``tokens``, ``seconds``, ``model_dir``, ``selected_step``,
    ``world_size``,
    ``strategy`` (``single``, ``ddp`` or ``fsdp``).
    """
    spec = pick_device(job.model)
    ctx = init_process_group(spec)
    try:
        spec = device_for(spec, ctx)
        torch.manual_seed(job.train.seed)  # LoRA initialisation; DDP also broadcasts rank 0's weights
        tokenizer = load_tokenizer(job.model_dir, job.model)
        policy = load_model(job.model_dir, job.model, spec)
        table = pd.read_parquet(job.tokenized)
        validation = None
        if job.validation_split is not None:
            validation = table[table["split"] == job.validation_split].reset_index(drop=True)
        if job.split is not None:
            table = table[table["split"] == job.split].reset_index(drop=True)
        reference = read_reference_table(job.reference) if job.reference else None
        ref_model = None
        if job.ref_model_dir:
            ref_model = load_model(job.ref_model_dir, job.model.model_copy(update={"lora": None}), spec).eval()
        out_dir = Path(job.out_dir)
        record: dict[str, Any] = {"world_size": ctx.world}
        try:
            result = train(policy, tokenizer, table, job.train, out_dir=out_dir, spec=spec, reference=reference,
                           ref_model=ref_model, validation=validation, on_step=_progress_printer(ctx),
                           stop_after_steps=job.stop_after_steps, progress_bar=False)
            record.update(status="complete", steps=result.steps, resumed_from_step=result.resumed_from_step,
                          tokens=result.tokens, seconds=result.seconds, model_dir=str(result.model_dir),
                          selected_step=result.selected_step)
        except TrainingInterrupted as exc:
            record.update(status="interrupted", steps=exc.step)
        # train() has accepted the combination by now
        record["strategy"] = resolve_strategy(job.train.strategy, job.train.processes, lora=job.model.lora is not None)
        if ctx.is_main:
            _write_result(out_dir, record)
        return record
    finally:
        destroy_process_group()


def run_reference_job(job: ReferenceJob) -> dict[str, Any]:
    """Score every pair with the reference model, rows split across the ranks; rank 0 writes the whole table.

    Returns (and rank 0 writes next to the table) ``{status, rows, world_size, out_file}``. Rank 0 prints
    ``DPO_PROGRESS {"done": d, "total": t}`` with its own share scaled to the whole table.
    """
    spec = pick_device(job.model)
    ctx = init_process_group(spec)
    try:
        spec = device_for(spec, ctx)
        model = load_model(job.model_dir, job.model, spec).eval()
        table = pd.read_parquet(job.tokenized)
        if job.splits is not None:
            table = table[table["split"].isin(job.splits)].reset_index(drop=True)

        def progress(done: int, total: int) -> None:
            if ctx.is_main:
                info = {"done": min(done * ctx.world, len(table)), "total": len(table)}
                print(PROGRESS_PREFIX + json.dumps(info), flush=True)

        logps = distributed_reference_logps(model, table, batch_size=job.batch_size, spec=spec, ctx=ctx,
                                            chunk_size=job.chunk_size, layout=job.layout, progress=progress)
        record = {"status": "complete", "rows": len(logps), "world_size": ctx.world, "out_file": job.out_file}
        if ctx.is_main:
            write_reference_table(logps, job.out_file)
            _write_result(job.result_dir, record)
        ctx.barrier()
        return record
    finally:
        destroy_process_group()


def _write_result(folder: Path, record: dict[str, Any]) -> None:
    with atomic_file(folder / RESULT_FILE) as handle:
        handle.write(json.dumps(record, indent=1))


def read_result(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the training processes ended without writing a result")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m dpo_core.train_main JOB.json  (normally started by torchrun via tasks.launch)",
              file=sys.stderr)
        return 2
    job = read_job(Path(args[0]))
    if isinstance(job, ReferenceJob):
        run_reference_job(job)
    else:
        run_job(job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
