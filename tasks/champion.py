"""The registered champion, for the promotion gate and warm starts (README "Scheduled retraining").

- `champion_lookup`: which version holds `champion` (and its lineage tags), once per flow run; `trained_before`:
  which version was already trained on this run's selected train pairs and config (nothing new to learn).
- `pinned_gate_stage`: the gate pairs stored with the champion, as an artifact ingest reads first.
- `champion_model_stage`: the champion as a Hugging Face folder (downloaded once per version).
- `champion_scores_stage`: the champion scored on this run's gate pairs exactly as the candidate is (the same
  tokenized rows, the same reference log-probs, the same prompts, decoding settings and judge), cached by the
  champion's content plus the gate set, so a champion is scored once per gate set.

The MLflow calls retry transient failures themselves (tracking.retry), so these tasks have no Prefect retries.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import task

from dpo_core.config import RunConfig
from dpo_core.evaluation import judged_answers, preference_scores
from dpo_core.fileio import sha256_file
from dpo_core.judges import make_judge
from dpo_core.models import load_tokenizer, pick_device
from dpo_core.reference import read_reference_table
from dpo_data.ingest import pair_set_id, read_pairs
from tasks.artifacts import build_artifact, prefect_cache_key, stage_key, tree_hash
from tasks.common import MODEL_LOAD_LOCK, load_model_locked
from tasks.ingest import split_pairs
from tasks.materialize import MODEL_FILES
from tracking.registry import (
    GATE_PAIRS_FILE,
    TAG_GATE_SET,
    champion_info,
    download_model_version,
    download_run_file,
    version_trained_on,
)
from tracking.tracker import RunTracker, tracking_uri

SCORES_FILE, ANSWERS_FILE = "scores.parquet", "answers.parquet"


@task(name="champion-lookup")
def champion_lookup(cfg: RunConfig) -> dict[str, Any] | None:
    """`tracking.registry.champion_info` (name, version, run id, tags) or None when there is no champion yet."""
    return champion_info(cfg)


def pinned_gate_id(champion: dict[str, Any]) -> str | None:
    """The id of the gate set stored with the champion (None for a version registered without one)."""
    return champion["tags"].get(TAG_GATE_SET)


@task(name="trained-before")
def trained_before(cfg: RunConfig, pairs: dict[str, Any]) -> dict[str, Any] | None:
    """The newest registered version trained on exactly these selected train pairs with this config (the champion
    or one that lost its gate: training again would give the same model), or None."""
    return version_trained_on(cfg, train_fingerprint=pairs["train_fingerprint"], config_hash=cfg.config_hash())


def _version_key(cfg: RunConfig, champion: dict[str, Any]) -> dict[str, Any]:
    return {"tracking_uri": tracking_uri(cfg), "name": champion["name"], "version": champion["version"],
            "source": champion.get("source")}


@task(name="gate-set")
def pinned_gate_stage(cfg: RunConfig, champion: dict[str, Any]) -> dict[str, Any]:
    """The gate pairs stored with the champion (`gate/pairs.parquet` on its run), checked against its tag."""
    expected = champion["tags"][TAG_GATE_SET]

    def fill(folder: Path) -> dict[str, Any]:
        got = download_run_file(RunTracker(cfg), champion["run_id"], GATE_PAIRS_FILE, folder / "download")
        if got is None:
            raise FileNotFoundError(f"champion v{champion['version']} is tagged {TAG_GATE_SET}={expected} but its "
                                    f"run {champion['run_id']} has no {GATE_PAIRS_FILE}")
        shutil.move(got, folder / "pairs.parquet")
        shutil.rmtree(folder / "download")
        found = pair_set_id(read_pairs(folder / "pairs.parquet")["pair_id"])
        if found != expected:
            raise ValueError(f"champion v{champion['version']}'s stored gate pairs hash to {found}, its tag says "
                             f"{expected}")
        return {"content_hash": expected, "pairs_file": "pairs.parquet", "gate_set_id": expected}

    manifest = build_artifact(cfg, "gate-set", stage_key("gate-set", {**_version_key(cfg, champion),
                                                                      "gate_set_id": expected}), fill)
    return {**manifest, "origin": f"gate set of champion v{champion['version']}"}


@task(name="champion-model")
def champion_model_stage(cfg: RunConfig, champion: dict[str, Any]) -> dict[str, Any]:
    """The champion's weights and tokenizer as one folder; a manifest shaped like tasks.materialize's."""

    def fill(folder: Path) -> dict[str, Any]:
        download_model_version(RunTracker(cfg), champion["name"], champion["version"], folder / "model")
        return {"content_hash": tree_hash(folder / "model", MODEL_FILES), "model_subdir": "model"}

    manifest = build_artifact(cfg, "champion-model", stage_key("champion-model", _version_key(cfg, champion)), fill)
    return {**manifest, "model_dir": str(Path(manifest["path"]) / "model"),
            "name": f"{champion['name']} v{champion['version']} (champion)", "version": champion["version"]}


def champion_scores_key(cfg: RunConfig, champion_model: dict[str, Any], base_model: dict[str, Any],
                        pairs: dict[str, Any], tokenized: dict[str, Any], gate_reference: dict[str, Any],
                        judge: dict[str, Any] | None = None) -> str:
    """The champion's content + the gate set + what scoring depends on (the base model that tokenized and
    referenced the gate pairs, templating, beta, decoding settings and the judge). Not the whole tokenized or
    reference table: new train data leaves a champion's gate scores cached (a judge trained again on it does not)."""
    spec = pick_device(cfg.model)
    inputs = {"champion": champion_model["content_hash"], "gate_set_id": pairs["gate_set_id"],
              "gate_split": pairs["gate_split"], "base_model": base_model["content_hash"],
              "template": cfg.template.model_dump(mode="json"), "system_prompt": cfg.model.system_prompt,
              "chat_template": cfg.model.chat_template, "beta": cfg.train.beta,
              "eval": cfg.eval.model_dump(mode="json",
                                          exclude={"bootstrap_samples", "confidence", "generation_threads"}),
              "chunk": cfg.train.logprob_chunk_size, "layout": cfg.train.batch_layout, "device": spec.device.type}
    return stage_key("champion-scores", inputs, [judge] if judge is not None else [])


@task(name="champion-scores", cache_key_fn=prefect_cache_key("champion-scores", champion_scores_key),
      persist_result=True)
def champion_scores_stage(cfg: RunConfig, champion_model: dict[str, Any], base_model: dict[str, Any],
                          pairs: dict[str, Any], tokenized: dict[str, Any], gate_reference: dict[str, Any],
                          judge: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per gate pair the champion's log-probs beside the gate reference's (dpo_core.evaluation.preference_scores), and
    when generations are compared its judged answers to the gate prompts (dpo_core.evaluation.judged_answers)."""
    split = pairs["gate_split"]

    def fill(folder: Path) -> dict[str, Any]:
        spec = pick_device(cfg.model)
        table = pd.read_parquet(Path(tokenized["path"]) / tokenized["tokenized_file"])
        rows = table[table["split"] == split].reset_index(drop=True)
        reference = read_reference_table(Path(gate_reference["path"]) / gate_reference["reference_file"])
        model = load_model_locked(champion_model["model_dir"], cfg.model.without_lora(), spec)
        scores = preference_scores(model, rows, reference_df=reference, batch_size=cfg.eval.batch_size, spec=spec,
                             chunk_size=cfg.train.logprob_chunk_size, layout=cfg.train.batch_layout, eval_set=split)
        scores.to_parquet(folder / SCORES_FILE, index=False)
        fields: dict[str, Any] = {"content_hash": sha256_file(folder / SCORES_FILE)[:16],
                                  "scores_file": SCORES_FILE, "version": champion_model.get("version"),
                                  "pairs": len(scores)}
        if cfg.eval.n_generations > 0:
            tokenizer = load_tokenizer(base_model["model_dir"], cfg.model)
            with MODEL_LOAD_LOCK:
                scorer = make_judge(cfg.eval.judge, device=spec.device, trained=judge["path"] if judge else None)
            answers = judged_answers(model, tokenizer, split_pairs(pairs, split), eval_cfg=cfg.eval, judge=scorer,
                                     spec=spec, system_prompt=cfg.model.system_prompt,
                                     max_prompt_length=cfg.template.max_prompt_length)
            answers.to_parquet(folder / ANSWERS_FILE, index=False)
            fields.update({"answers_file": ANSWERS_FILE, "judge": scorer.name})
        return fields

    key = champion_scores_key(cfg, champion_model, base_model, pairs, tokenized, gate_reference, judge)
    return build_artifact(cfg, "champion-scores", key, fill)


def read_champion_scores(manifest: dict[str, Any]) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """(per-pair scores, judged answers or None) of a champion-scores manifest."""
    folder = Path(manifest["path"])
    answers = pd.read_parquet(folder / manifest["answers_file"]) if manifest.get("answers_file") else None
    return pd.read_parquet(folder / manifest["scores_file"]), answers
