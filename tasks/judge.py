"""Stage: the judge of the generation comparison, trained (Bradley-Terry) or loaded, and measured.

Every judge is measured the same way before it judges anything: its pairwise accuracy on the held-out eval pairs
(does it score the dataset's chosen answer above the rejected one?) with a bootstrap CI (`dpo_core.judges
.judge_validity`). The manifest carries that validity; the compare stage prints it beside every win rate.

- `bradley_terry`: trains a linear head on frozen sentence embeddings on the train split only (every accepted train
  pair, not just the `data.max_train_pairs` DPO trains on: the flow hands this stage an ingest without that cap),
  its feature set and L2 strength picked by cross-validation on those train pairs; the head is saved in the artifact folder.
- `reward_model`: the user's reward-model folder, measured on the same pairs (nothing to train).
- `similarity`: reads the reference answers, so it cannot be measured on them; recorded as unvalidated.

The key covers the judge settings, the bootstrap settings, the pairs' content and the bytes of the model folder the
judge reads (the embedding model or the reward model), so DPO settings never retrain it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from dpo_core.config import RunConfig
from dpo_core.judges import SentenceEncoder, judge_validity, locate_judge, make_judge, train_bradley_terry
from dpo_core.models import pick_device
from dpo_data.ingest import read_pairs
from tasks.artifacts import build_artifact, prefect_cache_key, stage_key, tree_hash
from tasks.common import MODEL_LOAD_LOCK

STAGE = "judge"


def judge_data_config(cfg: RunConfig) -> RunConfig:
    """The config whose ingest feeds this stage: the run's data settings without the DPO training cap."""
    return cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_train_pairs": None})})


def judge_key(cfg: RunConfig, pairs: dict[str, Any]) -> str:
    inputs = {"judge": cfg.eval.judge.model_dump(mode="json"), "bootstrap_samples": cfg.eval.bootstrap_samples,
              "confidence": cfg.eval.confidence, "seed": cfg.eval.seed, "model_files": tree_hash(locate_judge(cfg.eval.judge))}
    return stage_key(STAGE, inputs, [pairs])


def _rows(pairs_df: Any) -> tuple[list[list[dict[str, str]]], list[str], list[str]]:
    prompts = [[{"role": str(m["role"]), "content": str(m["content"])} for m in p] for p in pairs_df["prompt"]]
    return prompts, [str(c) for c in pairs_df["chosen"]], [str(r) for r in pairs_df["rejected"]]


@task(name="judge", cache_key_fn=prefect_cache_key(STAGE, judge_key), persist_result=True)
def judge_stage(cfg: RunConfig, pairs: dict[str, Any]) -> dict[str, Any]:
    def fill(folder: Path) -> dict[str, Any]:
        judge_cfg = cfg.eval.judge
        device = pick_device(cfg.model).device
        canonical = read_pairs(Path(pairs["path"]) / pairs["pairs_file"])
        held_out = canonical[canonical["split"] == "eval"]
        if held_out.empty:
            raise ValueError("the judge is measured on the eval split, which has no pairs; check data.eval")
        training = None
        with MODEL_LOAD_LOCK:
            if judge_cfg.kind == "bradley_terry":
                encoder = SentenceEncoder(judge_cfg.path, device=device, max_tokens=judge_cfg.max_tokens)
            else:
                judge = make_judge(judge_cfg, device=device)
        if judge_cfg.kind == "bradley_terry":
            train = canonical[canonical["split"] == "train"]
            if judge_cfg.max_train_pairs is not None:
                train = train.head(judge_cfg.max_train_pairs)
            prompts, chosen, rejected = _rows(train)
            judge = train_bradley_terry(encoder, prompts, chosen, rejected, train["pair_id"].tolist(),
                                        l2_grid=judge_cfg.l2_grid, feature_sets=judge_cfg.feature_sets,
                                        folds=judge_cfg.folds)
            judge.save(folder)
            training = judge.info
        prompts, chosen, rejected = _rows(held_out)
        validity = judge_validity(judge, prompts, chosen, rejected, n_samples=cfg.eval.bootstrap_samples,
                                  confidence=cfg.eval.confidence, seed=cfg.eval.seed)
        (folder / "validity.json").write_text(json.dumps(validity, indent=1))
        return {"content_hash": tree_hash(folder), "kind": judge_cfg.kind, "name": judge.name,
                "validity": validity, "training": training}

    return build_artifact(cfg, STAGE, judge_key(cfg, pairs), fill)
