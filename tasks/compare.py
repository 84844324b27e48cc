"""Stage 7: policy-vs-reference generations on the gate set's prompts (the held-out eval split when the run has no
gate split), scored and judged by the judge stage's judge. `model` is the reference that answers beside the policy:
the base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

from data_contracts.evaluation import validate_generations
from dpo_core.config import RunConfig
from dpo_core.evaluation import compare_generations
from dpo_core.fileio import sha256_file
from dpo_core.judges import make_judge
from dpo_core.models import load_tokenizer, pick_device
from tasks.artifacts import build_artifact, prefect_cache_key, stage_key
from tasks.common import MODEL_LOAD_LOCK, load_model_locked
from tasks.ingest import split_pairs
from tasks.train_output import policy_dir

STAGE = "compare"


def compare_key(cfg: RunConfig, model: dict[str, Any], pairs: dict[str, Any], trained: dict[str, Any],
                judge: dict[str, Any]) -> str:
    inputs = {"eval": cfg.eval.model_dump(mode="json", exclude={"generation_threads"}), "beta": cfg.train.beta,
              "max_prompt_length": cfg.template.max_prompt_length,
              "system_prompt": cfg.model.system_prompt, "chat_template": cfg.model.chat_template}
    return stage_key(STAGE, inputs, [model, pairs, trained, judge])


@task(name="compare", cache_key_fn=prefect_cache_key(STAGE, compare_key), persist_result=True)
def compare_stage(cfg: RunConfig, model: dict[str, Any], pairs: dict[str, Any], trained: dict[str, Any],
                  judge: dict[str, Any]) -> dict[str, Any]:
    """`judge`: the judge stage's manifest (tasks/judge.py): the trained head's folder and the judge's validity."""
    def fill(folder: Path) -> dict[str, Any]:
        spec = pick_device(cfg.model)
        # the gate's prompts: the champion answers them too (tasks/champion.py)
        held_out = split_pairs(pairs, pairs.get("gate_split", "eval"))
        tokenizer = load_tokenizer(model["model_dir"], cfg.model)
        policy = load_model_locked(policy_dir(trained), cfg.model.without_lora(), spec)
        reference = load_model_locked(model["model_dir"], cfg.model.without_lora(), spec)
        with MODEL_LOAD_LOCK:
            scorer = make_judge(cfg.eval.judge, device=spec.device, trained=judge["path"])
        table, summary = compare_generations(
            policy, reference, tokenizer, held_out, eval_cfg=cfg.eval, beta=cfg.train.beta, judge=scorer,
            judge_validity=judge["validity"], spec=spec, system_prompt=cfg.model.system_prompt, max_prompt_length=cfg.template.max_prompt_length,
        )
        table = validate_generations(table)
        out = folder / "generations.parquet"
        table.to_parquet(out, index=False)
        (folder / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        return {"content_hash": sha256_file(out)[:16], "generations_file": "generations.parquet",
                "summary": json.loads(json.dumps(summary, default=str))}

    return build_artifact(cfg, STAGE, compare_key(cfg, model, pairs, trained, judge), fill)
