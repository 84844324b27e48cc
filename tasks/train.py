"""Stage 5: DPO training. Checkpoints live in a persistent working folder, so a re-run after a crash resumes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from dpo_core.config import VALIDATION_SPLIT, RunConfig
from dpo_core.distributed import resolve_strategy
from dpo_core.fileio import sha256_file
from dpo_core.models import load_model, load_tokenizer, pick_device
from dpo_core.reference import read_reference_table
from dpo_core.train_main import TrainJob
from dpo_core.trainer import TrainResult, train
from tasks.artifacts import artifact_dir, build_artifact, prefect_cache_key, stage_key
from tasks.common import Progress
from tasks.launch import launch_training
from tasks.reference import base_model_config

STAGE = "train"
# Fault injection for the restart tests: raise after this optimizer step has completed (and been checkpointed
# when it falls on a checkpoint boundary). Never set in normal use.
FAIL_AFTER_STEP_ENV = "DPO_FAIL_AFTER_STEP"


class InjectedFailure(RuntimeError):
    """Raised by the fault-injection hook; only tests set DPO_FAIL_AFTER_STEP."""


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
        if cfg.train.processes > 1:
            result = _train_distributed(cfg, model, tokenized, reference, folder)
            return _finish(folder, key, result)
        spec = pick_device(cfg.model)
        table = pd.read_parquet(Path(tokenized["path"]) / tokenized["tokenized_file"])
        train_rows = table[table["split"] == "train"].reset_index(drop=True)
        validation = table[table["split"] == VALIDATION_SPLIT].reset_index(drop=True)
        tokenizer = load_tokenizer(model["model_dir"], cfg.model)
        policy = load_model(model["model_dir"], cfg.model, spec)
        ref_table, ref_model = None, None
        precomputed, live = _reference_kind(cfg)
        if precomputed:
            ref_table = read_reference_table(Path(reference["path"]) / reference["reference_file"])
        elif live:
            ref_model = load_model(model["model_dir"], base_model_config(cfg), spec).eval()

        progress = Progress("training", f"DPO training on {len(train_rows)} pairs")
        fail_after = int(os.environ.get(FAIL_AFTER_STEP_ENV, "0") or 0)

        def on_step(metrics: dict[str, Any]) -> None:
            progress.update(int(metrics["step"]), int(metrics.get("total_steps", metrics["step"])))
            if fail_after and int(metrics["step"]) >= fail_after:
                raise InjectedFailure(f"injected failure after step {metrics['step']} ({FAIL_AFTER_STEP_ENV})")

        result = train(
            policy, tokenizer, train_rows, cfg.train, out_dir=folder, spec=spec,
            reference=ref_table, ref_model=ref_model, validation=validation, on_step=on_step, progress_bar=True,
        )
        progress.update(result.steps, result.steps, force=True)
        return _finish(folder, key, result)

    manifest = build_artifact(cfg, STAGE, key, fill, work_dir=work_dir(cfg, key))
    # intermediate checkpoints (weights + optimizer) are only for resuming: dropped once the artifact is in place, so
    # a crash while the artifact is being finished still resumes from the last step instead of training again
    shutil.rmtree(Path(manifest["path"]) / "checkpoints", ignore_errors=True)
    return manifest


def _reference_kind(cfg: RunConfig) -> tuple[bool, bool]:
    """(read the precomputed table, load a live frozen reference model): neither for a reference-free objective
    (``TrainConfig.needs_reference``) nor for a LoRA policy's live reference (the policy with adapters disabled)."""
    needed = cfg.train.needs_reference()
    precomputed = needed and cfg.train.precompute_reference
    return precomputed, needed and not precomputed and cfg.model.lora is None


def _train_distributed(cfg: RunConfig, model: dict[str, Any], tokenized: dict[str, Any], reference: dict[str, Any],
                       folder: Path) -> TrainResult:
    """train.processes ranks under torchrun (tasks.launch); their output and progress stream into this run."""
    precomputed, live = _reference_kind(cfg)
    job = TrainJob(
        model_dir=str(model["model_dir"]), model=cfg.model,
        tokenized=str(Path(tokenized["path"]) / tokenized["tokenized_file"]), split="train",
        validation_split=VALIDATION_SPLIT,
        reference=str(Path(reference["path"]) / reference["reference_file"]) if precomputed else None,
        ref_model_dir=str(model["model_dir"]) if live else None,  # LoRA: the policy with adapters disabled
        train=cfg.train, out_dir=str(folder),
    )  # DPO_FAIL_AFTER_STEP reaches the ranks through the environment (rank 0 fails)
    progress = Progress("training", f"DPO training on {cfg.train.processes} processes")
    record = launch_training(job, cfg.train.processes, timeout_s=cfg.timeouts.train,
                             on_progress=lambda m: progress.update(int(m["step"]), int(m["total_steps"])))
    progress.update(record["steps"], record["steps"], force=True)
    history = [json.loads(line) for line in (folder / "history.jsonl").read_text().splitlines() if line.strip()]
    return TrainResult(model_dir=Path(record["model_dir"]), steps=record["steps"], history=history,
                       resumed_from_step=record["resumed_from_step"], tokens=record["tokens"],
                       seconds=record["seconds"], selected_step=record["selected_step"])


def _finish(folder: Path, key: str, result: TrainResult) -> dict[str, Any]:
    """Write history and result files; the stage manifest (the checkpoints go once the artifact is in place)."""
    model_subdir = Path(result.model_dir).relative_to(folder)
    weights = sorted((folder / model_subdir).glob("*.safetensors"))
    final_metrics = result.history[-1] if result.history else {}
    selected = next((r for r in result.history if r.get("step") == result.selected_step), {})
    with open(folder / "history.jsonl", "w") as f:  # the whole run's history, resumed parts included
        for row in result.history:
            f.write(json.dumps(row, default=float) + "\n")
    (folder / "train_result.json").write_text(
        json.dumps({"steps": result.steps, "resumed_from_step": result.resumed_from_step,
                    "tokens": result.tokens, "seconds": result.seconds}, indent=1)
    )
    return {
        "content_hash": sha256_file(weights[0])[:16] if weights else key,
        "model_subdir": str(model_subdir),
        "history_file": "history.jsonl",
        "steps": result.steps,
        "resumed_from_step": result.resumed_from_step,
        "tokens": result.tokens,
        "train_seconds": result.seconds,
        "final_metrics": {k: v for k, v in final_metrics.items() if isinstance(v, (int, float))},
        # whose weights the stage outputs (train.select) and that step's validation metrics ({} without validation)
        "selected_step": result.selected_step,
        "validation": {k: v for k, v in selected.items() if k.startswith("val/")},
    }


def policy_dir(train_manifest: dict[str, Any]) -> Path:
    return Path(train_manifest["path"]) / train_manifest["model_subdir"]


def read_history(train_manifest: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(train_manifest["path"]) / train_manifest["history_file"]
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
