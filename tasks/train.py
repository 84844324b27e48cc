"""Stage 5: DPO training. Checkpoints live in a persistent working folder, so a re-run after a crash resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from prefect import task

from dpo_core.config import VALIDATION_SPLIT, RunConfig
from dpo_core.distributed import resolve_strategy
from dpo_core.fileio import sha256_file
from dpo_core.models import pick_device
from dpo_core.train_main import TrainJob, run_train_job
from tasks.artifacts import artifact_dir, build_artifact, prefect_cache_key, stage_key
from tasks.common import Progress
from tasks.launch import launch_training
from tasks.train_output import read_history_file

STAGE = "train"


def train_key(cfg: RunConfig, model: dict[str, Any], tokenized: dict[str, Any], reference: dict[str, Any]) -> str:
    spec = pick_device(cfg.model)
    inputs = {
        # where the ranks run (node count, rendezvous address) does not change the result
        "train": cfg.train.model_dump(mode="json", exclude={"nnodes", "rdzv_endpoint", "rdzv_id"}),
        "model": cfg.model.model_dump(mode="json", exclude={"num_threads"}),
        "device": spec.device.type,
    }
    return stage_key(STAGE, inputs, [model, tokenized, reference])


def work_dir(cfg: RunConfig, key: str) -> Path:
    """Where checkpoints accumulate until training completes (renamed to the artifact folder then)."""
    final = artifact_dir(cfg, STAGE, key)
    return final.with_name(f".{key}.work")


@task(name="train", cache_key_fn=prefect_cache_key(STAGE, train_key), persist_result=True)
def train_stage(cfg: RunConfig, model: dict[str, Any], tokenized: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    key = train_key(cfg, model, tokenized, reference)

    def fill(folder: Path) -> dict[str, Any]:
        # a bad combination fails before any launch
        resolve_strategy(cfg.train.strategy, cfg.train.processes, lora=cfg.model.lora is not None)
        job = train_job(cfg, model, tokenized, reference, folder)
        progress = Progress("training", f"DPO training on {cfg.train.processes} process(es)")

        def on_step(metrics: dict[str, Any]) -> None:
            progress.update(int(metrics["step"]), int(metrics["total_steps"]))

        if cfg.train.processes > 1:  # the ranks' output and progress stream into this run
            record = launch_training(job, cfg.train.processes, timeout_s=cfg.timeouts.train, on_progress=on_step)
        else:
            record = run_train_job(job, on_step=on_step, progress_bar=True)
        progress.update(record["steps"], record["steps"], force=True)
        return _finish(folder, key, record)

    manifest = build_artifact(cfg, STAGE, key, fill, work_dir=work_dir(cfg, key))
    # intermediate checkpoints (weights + optimizer) are only for resuming: dropped once the artifact is in place, so
    # a crash while the artifact is being finished still resumes from the last step instead of training again
    shutil.rmtree(Path(manifest["path"]) / "checkpoints", ignore_errors=True)
    return manifest


def train_job(cfg: RunConfig, model: dict[str, Any], tokenized: dict[str, Any], reference: dict[str, Any],
              folder: Path) -> TrainJob:
    """The training job of this stage, with the reference ``_reference_kind`` picks."""
    precomputed, live = _reference_kind(cfg)
    return TrainJob(
        model_dir=str(model["model_dir"]), model=cfg.model,
        tokenized=str(Path(tokenized["path"]) / tokenized["tokenized_file"]), split="train",
        validation_split=VALIDATION_SPLIT,
        reference=str(Path(reference["path"]) / reference["reference_file"]) if precomputed else None,
        ref_model_dir=str(model["model_dir"]) if live else None,
        train=cfg.train, out_dir=str(folder),
    )


def _reference_kind(cfg: RunConfig) -> tuple[bool, bool]:
    """(read the precomputed table, load a live frozen reference model): neither for a reference-free objective
    (``TrainConfig.needs_reference``) nor for a LoRA policy's live reference (the policy with adapters disabled)."""
    needed = cfg.train.needs_reference()
    precomputed = needed and cfg.train.precompute_reference
    return precomputed, needed and not precomputed and cfg.model.lora is None


def _finish(folder: Path, key: str, record: dict[str, Any]) -> dict[str, Any]:
    """The stage manifest of a finished run (``run_train_job``'s record); writes its ``train_result.json``.

    The trainer has written the whole run's ``history.jsonl`` (resumed parts included) into ``folder``; the
    checkpoints go once the artifact is in place.
    """
    model_subdir = Path(record["model_dir"]).relative_to(folder)
    weights = sorted((folder / model_subdir).glob("*.safetensors"))
    history = read_history_file(folder / "history.jsonl")
    final_metrics = history[-1] if history else {}
    selected = next((r for r in history if r.get("step") == record["selected_step"]), {})
    (folder / "train_result.json").write_text(
        json.dumps({k: record[k] for k in ("steps", "resumed_from_step", "tokens", "seconds")}, indent=1)
    )
    return {
        "content_hash": sha256_file(weights[0])[:16] if weights else key,
        "model_subdir": str(model_subdir),
        "history_file": "history.jsonl",
        "steps": record["steps"],
        "resumed_from_step": record["resumed_from_step"],
        "tokens": record["tokens"],
        "train_seconds": record["seconds"],
        "final_metrics": {k: v for k, v in final_metrics.items() if isinstance(v, (int, float))},
        # whose weights the stage outputs (train.select) and that step's validation metrics ({} without validation)
        "selected_step": record["selected_step"],
        "validation": {k: v for k, v in selected.items() if k.startswith("val/")},
    }
