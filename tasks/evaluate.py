"""Stage 6: preference evaluation of the trained policy on every held-out set (reference log-probs reused)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from data_contracts.evaluation import METRIC_COLUMNS, validate_metrics, validate_unpaired_metrics
from dpo_data.ingest import GATE_SPLIT
from dpo_core.config import RunConfig, stable_hash
from dpo_core.evaluation import EvaluationError, preference_record, preference_scores, unpaired_record
from dpo_core.fileio import sha256_file
from dpo_core.models import pick_device
from dpo_core.reference import read_reference_table
from tasks.artifacts import build_artifact, prefect_cache_key, stage_key
from tasks.common import load_model_locked
from tasks.train_output import policy_dir

STAGE = "evaluate"
_GENERATION_FIELDS = {"n_generations", "generation_batch_size", "generation_threads", "max_new_tokens", "do_sample",
                      "temperature", "top_p", "judge"}
PAIR_SCORES_FILE = "pair_scores.parquet"
UNPAIRED_SCORES_FILE = "unpaired_scores.parquet"


def eval_sets(cfg: RunConfig, splits: Iterable[str] = ()) -> list[str]:
    """Names of the held-out sets: `eval`, every extra eval set, and the gate set when the run has one. `eval` may
    be empty beside a gate set (the gate took its pairs); it is then left out."""
    present = set(splits)
    sets = ["eval", *cfg.data.extra_eval.keys()]
    if GATE_SPLIT in present:
        sets = [s for s in sets if s != "eval" or "eval" in present] + [GATE_SPLIT]
    return sets


def evaluate_key(cfg: RunConfig, trained: dict[str, Any], tokenized: dict[str, Any], reference: dict[str, Any],
                 gate_reference: dict[str, Any] | None = None, gate_split: str = GATE_SPLIT) -> str:
    inputs = {"eval": cfg.eval.model_dump(mode="json", exclude=_GENERATION_FIELDS), "beta": cfg.train.beta,
              "sets": eval_sets(cfg), "chunk": cfg.train.logprob_chunk_size,
              "gate_split": gate_split if gate_reference is not None else None}
    upstream = [trained, tokenized, reference, *([gate_reference] if gate_reference is not None else [])]
    return stage_key(STAGE, inputs, upstream)


@task(name="evaluate", cache_key_fn=prefect_cache_key(STAGE, evaluate_key), persist_result=True)
def evaluate_stage(cfg: RunConfig, trained: dict[str, Any], tokenized: dict[str, Any], reference: dict[str, Any],
                   gate_reference: dict[str, Any] | None = None, gate_split: str = GATE_SPLIT) -> dict[str, Any]:
    """Metrics per held-out set and every pair's scores (`pair_scores.parquet`: eval_set + dpo_core.evaluation
    preference_scores columns). A set of unpaired rows (KTO's data, rows with a `label` in the tokenized table) gets
    an unpaired record instead (`unpaired_metrics` in the manifest, `unpaired_metrics.parquet`; its rows' scores
    with their labels in `unpaired_scores.parquet`). The set the promotion gate scores on (`gate_split`: `gate`, or
    `eval` when that is the gate) is scored against `gate_reference` when given (the base model's log-probs when the
    policy started from the champion), every other set against `reference`."""
    def fill(folder: Path) -> dict[str, Any]:
        spec = pick_device(cfg.model)
        table = pd.read_parquet(Path(tokenized["path"]) / tokenized["tokenized_file"])
        ref_table = read_reference_table(Path(reference["path"]) / reference["reference_file"])
        gate_table = (read_reference_table(Path(gate_reference["path"]) / gate_reference["reference_file"])
                      if gate_reference is not None else ref_table)
        policy = load_model_locked(policy_dir(trained), cfg.model.without_lora(), spec)
        rows, scored, unpaired_rows, unpaired_scored = [], [], [], []
        for name in eval_sets(cfg, table["split"].unique()):
            subset = table[table["split"] == name].reset_index(drop=True)
            if subset.empty:
                raise EvaluationError(f"eval set '{name}' has no valid tokenized pairs; check data.eval / data.extra_eval")
            scores = preference_scores(
                policy, subset, reference_df=gate_table if name == gate_split else ref_table,
                batch_size=cfg.eval.batch_size, spec=spec, chunk_size=cfg.train.logprob_chunk_size,
                layout=cfg.train.batch_layout, eval_set=name,
            )
            settings = {"bootstrap_samples": cfg.eval.bootstrap_samples, "confidence": cfg.eval.confidence,
                        "seed": cfg.eval.seed, "eval_set": name}
            if "label" in subset.columns and subset["label"].notna().all():  # unpaired (KTO) rows
                labels = subset["label"].astype(bool).to_numpy()
                unpaired_rows.append(unpaired_record(scores, labels, cfg.train.beta, **settings))
                unpaired_scored.append(scores.assign(eval_set=name, label=labels))
                continue
            rows.append(preference_record(scores, cfg.train.beta, **settings))
            scored.append(scores.assign(eval_set=name))
        metrics = validate_metrics(pd.DataFrame(rows)) if rows else pd.DataFrame(columns=METRIC_COLUMNS)
        out = folder / "metrics.parquet"
        metrics.to_parquet(out, index=False)
        if scored:
            pd.concat(scored, ignore_index=True).to_parquet(folder / PAIR_SCORES_FILE, index=False)
        records = json.loads(metrics.to_json(orient="records"))
        (folder / "metrics.json").write_text(json.dumps(records, indent=1))
        manifest = {"content_hash": sha256_file(out)[:16], "metrics_file": "metrics.parquet",
                    "pair_scores_file": PAIR_SCORES_FILE, "metrics": records}
        if unpaired_rows:
            unpaired = validate_unpaired_metrics(pd.DataFrame(unpaired_rows))
            unpaired.to_parquet(folder / "unpaired_metrics.parquet", index=False)
            pd.concat(unpaired_scored, ignore_index=True).to_parquet(folder / UNPAIRED_SCORES_FILE, index=False)
            manifest["unpaired_metrics"] = json.loads(unpaired.to_json(orient="records"))
            unpaired_hash = sha256_file(folder / "unpaired_metrics.parquet")
            manifest["content_hash"] = stable_hash([manifest["content_hash"], unpaired_hash])
        return manifest

    return build_artifact(cfg, STAGE, evaluate_key(cfg, trained, tokenized, reference, gate_reference, gate_split),
                          fill)


def pair_scores(evaluate: dict[str, Any], eval_set: str) -> pd.DataFrame:
    """The per-pair scores of one eval set from an evaluate manifest."""
    table = pd.read_parquet(Path(evaluate["path"]) / evaluate["pair_scores_file"])
    return table[table["eval_set"] == eval_set].drop(columns="eval_set").reset_index(drop=True)
