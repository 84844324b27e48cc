"""Stage 4: one batched no-grad pass of the frozen reference model over the tokenized pairs.

Training and evaluation read this table instead of keeping a second model in memory. Every split is scored, except
when the training objective reads no reference (``TrainConfig.needs_reference``: ORPO, CPO, SimPO, SFT): then only
the evaluation splits, which the evaluate stage compares against the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from data_contracts.reference import validate_reference
from dpo_core.config import VALIDATION_SPLIT, RunConfig
from dpo_core.fileio import sha256_file
from dpo_core.models import pick_device
from dpo_core.reference import read_reference_table, write_reference_table
from dpo_core.train_main import ReferenceJob, run_reference_job
from tasks.artifacts import build_artifact, prefect_cache_key, stage_key
from tasks.common import Progress
from tasks.launch import launch_reference

STAGE = "reference"


# the splits only training reads
TRAINING_SPLITS = ("train", VALIDATION_SPLIT)


def reference_key(cfg: RunConfig, model: dict[str, Any], tokenized: dict[str, Any],
                  only_split: str | None = None) -> str:
    spec = pick_device(cfg.model)
    inputs = {"device": spec.device.type, "autocast": str(spec.autocast_dtype), "dtype": str(spec.dtype),
              "training_splits": cfg.train.needs_reference(), "only_split": only_split}
    return stage_key(STAGE, inputs, [model, tokenized])


def scored_splits(cfg: RunConfig, table: pd.DataFrame) -> list[str] | None:
    """The splits the reference scores: None (every one) when training reads the reference, else the evaluation
    splits alone."""
    if cfg.train.needs_reference():
        return None
    return sorted(set(table["split"]) - set(TRAINING_SPLITS))


@task(name="reference", cache_key_fn=prefect_cache_key(STAGE, reference_key), persist_result=True)
def reference_stage(cfg: RunConfig, model: dict[str, Any], tokenized: dict[str, Any],
                    only_split: str | None = None) -> dict[str, Any]:
    """The reference log-probs of the tokenized pairs under `model`; `only_split`: of that split's pairs only (the
    base model's on the gate set, when the policy starts from the champion)."""
    def fill(folder: Path) -> dict[str, Any]:
        tokenized_file = Path(tokenized["path"]) / tokenized["tokenized_file"]
        table = pd.read_parquet(tokenized_file)
        splits = [only_split] if only_split is not None else scored_splits(cfg, table)
        if splits is not None:
            table = table[table["split"].isin(splits)].reset_index(drop=True)
        out = folder / "reference.parquet"
        progress = Progress("reference-precompute", f"reference log-probs ({len(table)} pairs)", bar_unit="pair")
        # rows split across torchrun ranks, one table gathered by rank 0; with several machines (train.nnodes) only
        # this machine's share of the ranks runs it (no other node is started for the precompute); one split alone
        # (a gate set) is small and runs here
        local = cfg.train.processes // cfg.train.nnodes if only_split is None else 1
        job = ReferenceJob(model_dir=str(model["model_dir"]), model=cfg.model.without_lora(),
                           tokenized=str(tokenized_file), out_file=str(out),
                           batch_size=cfg.train.reference_batch_size, chunk_size=cfg.train.logprob_chunk_size,
                           layout=cfg.train.batch_layout, processes=local, splits=splits)
        if local > 1:
            launch_reference(job, on_progress=lambda p: progress.update(int(p["done"]), int(p["total"])))
        else:
            run_reference_job(job, progress=progress.update)
        logps = read_reference_table(out)
        progress.update(len(table), len(table), force=True)
        logps = validate_reference(logps, table)
        write_reference_table(logps, out)
        return {"content_hash": sha256_file(out)[:16], "reference_file": "reference.parquet", "rows": len(logps)}

    return build_artifact(cfg, STAGE, reference_key(cfg, model, tokenized, only_split), fill)
