"""Stage 6: preference evaluation of the trained policy on every held-out set (reference log-probs reused)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from data_contracts.evaluation import validate_metrics
from dpo_core.config import RunConfig
from dpo_core.evaluation import EvaluationError, evaluate_preferences
from dpo_core.fileio import sha256_file
from dpo_core.models import pick_device
from dpo_core.reference import read_reference_table
from tasks.artifacts import build_artifact, prefect_cache_key, stage_key
from tasks.common import load_model_locked
from tasks.reference import base_model_config
from tasks.train import policy_dir

STAGE = "evaluate"
_GENERATION_FIELDS = {"n_generations", "generation_batch_size", "max_new_tokens", "do_sample", "temperature", "top_p",
                      "judge"}


def eval_sets(cfg: RunConfig) -> list[str]:
    """Names of the held-out sets: `eval` plus every extra eval set."""
    return ["eval", *cfg.data.extra_eval.keys()]


def evaluate_key(cfg: RunConfig, trained: dict[str, Any], tokenized: dict[str, Any], reference: dict[str, Any]) -> str:
    inputs = {"eval": cfg.eval.model_dump(mode="json", exclude=_GENERATION_FIELDS), "beta": cfg.train.beta,
              "sets": eval_sets(cfg), "chunk": cfg.train.logprob_chunk_size}
    return stage_key(STAGE, inputs, [trained, tokenized, reference])


@task(name="evaluate", cache_key_fn=prefect_cache_key(STAGE, evaluate_key), persist_result=True)
def evaluate_stage(cfg: RunConfig, trained: dict[str, Any], tokenized: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    def fill(folder: Path) -> dict[str, Any]:
        spec = pick_device(cfg.model)
        table = pd.read_parquet(Path(tokenized["path"]) / tokenized["tokenized_file"])
        ref_table = read_reference_table(Path(reference["path"]) / reference["reference_file"])
        policy = load_model_locked(policy_dir(trained), base_model_config(cfg), spec)
        rows = []
        for name in eval_sets(cfg):
            subset = table[table["split"] == name].reset_index(drop=True)
            if subset.empty:
                raise EvaluationError(f"eval set '{name}' has no valid tokenized pairs; check data.eval / data.extra_eval")
            rows.append(
                evaluate_preferences(
                    policy, subset, reference_df=ref_table, beta=cfg.train.beta, batch_size=cfg.eval.batch_size,
                    spec=spec, chunk_size=cfg.train.logprob_chunk_size, layout=cfg.train.batch_layout,
                    bootstrap_samples=cfg.eval.bootstrap_samples,
                    confidence=cfg.eval.confidence, seed=cfg.eval.seed, eval_set=name,
                )
            )
        metrics = validate_metrics(pd.DataFrame(rows))
        out = folder / "metrics.parquet"
        metrics.to_parquet(out, index=False)
        records = json.loads(metrics.to_json(orient="records"))
        (folder / "metrics.json").write_text(json.dumps(records, indent=1))
        return {"content_hash": sha256_file(out)[:16], "metrics_file": "metrics.parquet", "metrics": records}

    return build_artifact(cfg, STAGE, evaluate_key(cfg, trained, tokenized, reference), fill)
