"""Stage 3: render every pair through the tokenizer's chat template, truncate, validate the tokenized table.

For an unpaired objective (KTO, ``TrainConfig.is_unpaired``) the training splits are KTO rows instead of pairs
(``dpo_data.unpaired.kto_rows``: each completion with a seeded mismatched KL completion, laid out as a pair), and so
are unpaired held-out rows; the tokenized table then has a ``label`` column (True / False on KTO rows, null on pairs)
and ``kl_row_id`` (the row whose completion is the KL completion).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task

import pandas as pd

from dpo_data.ingest import TRAINING_SPLITS, read_pairs
from dpo_data.unpaired import kto_rows
from data_contracts.tokenized import validate_tokenized
from dpo_core.config import RunConfig
from dpo_core.fileio import sha256_file
from dpo_core.models import load_tokenizer
from dpo_core.templating import ChatRenderer, tokenize_pairs
from tasks.artifacts import build_artifact, prefect_cache_key, stage_key
from tasks.ingest import unpaired_rows

STAGE = "template"


def template_key(cfg: RunConfig, model: dict[str, Any], pairs: dict[str, Any]) -> str:
    inputs = {
        "template": cfg.template.model_dump(mode="json"),
        "system_prompt": cfg.model.system_prompt,
        "chat_template": cfg.model.chat_template,
        "kto_seed": cfg.train.seed if cfg.train.is_unpaired() else None,  # it chooses the KL completions
    }
    return stage_key(STAGE, inputs, [model, pairs])


@task(name="template", cache_key_fn=prefect_cache_key(STAGE, template_key), persist_result=True)
def template_stage(cfg: RunConfig, model: dict[str, Any], pairs: dict[str, Any]) -> dict[str, Any]:
    def fill(folder: Path) -> dict[str, Any]:
        tokenizer = load_tokenizer(model["model_dir"], cfg.model)
        canonical = read_pairs(Path(pairs["path"]) / pairs["pairs_file"])
        kto = None
        if cfg.train.is_unpaired():  # training splits (and unpaired held-out rows) as KTO rows
            kto = kto_rows(unpaired_rows(pairs), seed=cfg.train.seed)
            canonical = pd.concat([kto[canonical.columns], canonical[~canonical["split"].isin(TRAINING_SPLITS)]],
                                  ignore_index=True)
        table, report = tokenize_pairs(
            canonical, tokenizer, cfg.template.max_length, cfg.template.max_prompt_length, cfg.model.system_prompt
        )
        if kto is not None:
            table = table.merge(kto[["pair_id", "label", "kl_row_id"]], on="pair_id", how="left")
            table["label"] = table["label"].astype("boolean")
        header = ChatRenderer(tokenizer, cfg.model.system_prompt).header_ids
        table = validate_tokenized(table, cfg.template.max_length, generation_header_ids=header)
        out = folder / "tokenized.parquet"
        table.to_parquet(out, index=False)
        report_dict = report.to_dict() if hasattr(report, "to_dict") else dict(vars(report))
        # pairs that could not be tokenized (e.g. no room for a response) are reported, never silently dropped
        with open(folder / "rejected.jsonl", "w") as f:
            for row in report_dict.get("rejected", []):
                f.write(json.dumps(row) + "\n")
        (folder / "report.json").write_text(json.dumps(report_dict, indent=1, default=str))
        return {
            "content_hash": sha256_file(out)[:16],
            "tokenized_file": "tokenized.parquet",
            "report": {k: v for k, v in report_dict.items() if k != "rejected"},
            "rejected": len(report_dict.get("rejected", [])),
            "rows": len(table),
        }

    return build_artifact(cfg, STAGE, template_key(cfg, model, pairs), fill)
