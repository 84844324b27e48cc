"""One entry path per job, in this process or as one rank of a torchrun group: ``run_train_job`` and
``run_reference_job``.

Two kinds of job: ``TrainJob`` (DPO training) and ``ReferenceJob`` (the reference log-prob precompute, split across
the ranks and gathered into one table by ``dpo_core.distributed.distributed_reference_logps``). A job names the
model folder and its ``ModelConfig``, the tokenized pairs (Parquet), the reference table (Parquet, optional), the
``TrainConfig`` and the output. The train and reference tasks build the job and either call ``run_train_job`` /
``run_reference_job`` here (one process) or write it as JSON and start ``train.processes`` ranks with
``tasks.launch``, each of which runs ``python -m dpo_core.train_main JOB.json`` (``main``) and calls the same function.

Every rank loads the model and data itself, joins the process group (gloo on CPU, NCCL on CUDA; none for a single
process) and calls ``dpo_core.trainer.train`` (``distributed_reference_logps`` for a reference job). Under torchrun,
rank 0 prints one ``DPO_PROGRESS {json}`` line per optimizer step (the launcher turns them into Prefect progress)
and finally writes the job's result record to ``train_main_result.json`` (in ``out_dir``; a reference job: next to
its table), which the launcher reads.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Union

import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from dpo_core.config import ModelConfig, TrainConfig
from dpo_core.distributed import destroy_process_group, device_for, distributed_reference_logps
from dpo_core.distributed import init_process_group, resolve_strategy
from dpo_core.fileio import atomic_file
from dpo_core.models import load_model, load_tokenizer, pick_device
from dpo_core.reference import read_reference_table, write_reference_table
from dpo_core.trainer import train

__all__ = ["TrainJob", "ReferenceJob", "RESULT_FILE", "PROGRESS_PREFIX", "run_train_job", "run_reference_job",
           "read_job", "read_result", "main"]

RESULT_FILE = "train_main_result.json"
PROGRESS_PREFIX = "DPO_PROGRESS "


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


def run_train_job(job: TrainJob, *, on_step: Callable[[dict[str, Any]], None] | None = None,
                  progress_bar: bool = False) -> dict[str, Any]:
    """Train as ``job`` says in this process (alone, or one rank of a torchrun group); return the result record.

    The RNG is seeded with ``train.seed`` before the model is built, so LoRA's initial adapters are the same on every
    path and every rank, whatever ran before (DDP also broadcasts rank 0's weights). ``on_step`` gets each optimizer
    step's metrics on rank 0 (after that step's checkpoint, if it has one).

    The record has ``status`` ("complete"), ``steps``, ``resumed_from_step``, ``tokens``, ``seconds``, ``model_dir``,
    ``selected_step``, ``world_size``, ``strategy`` (``single``, ``ddp`` or ``fsdp``).
    """
    spec = pick_device(job.model)
    ctx = init_process_group(spec)
    try:
        spec = device_for(spec, ctx)
        torch.manual_seed(job.train.seed)
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
            ref_model = load_model(job.ref_model_dir, job.model.without_lora(), spec).eval()
        result = train(policy, tokenizer, table, job.train, out_dir=Path(job.out_dir), spec=spec,
                       reference=reference, ref_model=ref_model, validation=validation,
                       on_step=on_step if ctx.is_main else None, progress_bar=progress_bar)
        return {"world_size": ctx.world, "status": "complete", "steps": result.steps,
                "resumed_from_step": result.resumed_from_step, "tokens": result.tokens, "seconds": result.seconds,
                "model_dir": str(result.model_dir), "selected_step": result.selected_step,
                # train() has accepted the combination by now
                "strategy": resolve_strategy(job.train.strategy, job.train.processes,
                                             lora=job.model.lora is not None)}
    finally:
        destroy_process_group()


def run_reference_job(job: ReferenceJob, *, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Score the job's pairs with the reference model (rows split across the ranks); rank 0 writes the whole table.

    Returns ``{status, rows, world_size, out_file}``. ``progress(done, total)`` is called on rank 0 after each batch,
    with its own share of the rows scaled to the whole table.
    """
    spec = pick_device(job.model)
    ctx = init_process_group(spec)
    try:
        spec = device_for(spec, ctx)
        model = load_model(job.model_dir, job.model, spec).eval()
        table = pd.read_parquet(job.tokenized)
        if job.splits is not None:
            table = table[table["split"].isin(job.splits)].reset_index(drop=True)

        def report(done: int, total: int) -> None:
            if progress is not None and ctx.is_main:
                progress(min(done * ctx.world, len(table)), len(table))

        logps = distributed_reference_logps(model, table, batch_size=job.batch_size, spec=spec, ctx=ctx,
                                            chunk_size=job.chunk_size, layout=job.layout, progress=report)
        if ctx.is_main:
            write_reference_table(logps, job.out_file)
        ctx.barrier()
        return {"status": "complete", "rows": len(logps), "world_size": ctx.world, "out_file": job.out_file}
    finally:
        destroy_process_group()


def _print_progress(info: dict[str, Any]) -> None:
    """One ``DPO_PROGRESS {json}`` line for the launcher (``tasks.launch``), in a single write: torchrun's ``--tee``
    forwards whatever part of a rank's log it has read, so a line written in two pieces (``print`` writes the text,
    then the newline) can reach the launcher cut in two."""
    sys.stdout.write(PROGRESS_PREFIX + json.dumps(info, default=float) + "\n")
    sys.stdout.flush()


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
        record = run_reference_job(job, progress=lambda done, total: _print_progress({"done": done, "total": total}))
    else:
        record = run_train_job(job, on_step=_print_progress)
    if int(os.environ.get("RANK", "0")) == 0:  # torchrun's rank of this process
        _write_result(job.result_dir, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
