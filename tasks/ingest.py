"""Stage 2: read every configured source, convert to canonical pairs, validate, quarantine, split, fingerprint."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import task
from prefect.tasks import exponential_backoff

from dpo_data.ingest import ingest, write_pairs
from dpo_core.config import RunConfig
from tasks.artifacts import PROJECT_ROOT, build_artifact, prefect_cache_key, stage_key, tree_hash
from tasks.common import retry_transient_only

STAGE = "ingest"


def data_root() -> Path:
    """Relative data paths are resolved against $DPO_DATA_ROOT, else the project folder."""
    return Path(os.environ.get("DPO_DATA_ROOT") or PROJECT_ROOT)


def _source_hashes(cfg: RunConfig) -> dict[str, str]:
    sources = [*cfg.data.train, *(cfg.data.eval or []), *cfg.data.extra_eval.values()]
    out = {}
    for src in sources:
        path = data_root() / src.path
        # a hub dataset id (or a missing path, which ingest reports clearly) is identified by its name
        out[src.path] = tree_hash(path) if path.exists() else f"missing-or-hub:{src.path}"
    return out


def ingest_key(cfg: RunConfig) -> str:
    return stage_key(STAGE, {"data": cfg.data.model_dump(mode="json"), "sources": _source_hashes(cfg)})


@task(
    name="ingest",
    cache_key_fn=prefect_cache_key(STAGE, ingest_key),
    persist_result=True,
    retries=2,
    retry_delay_seconds=exponential_backoff(2),
    retry_condition_fn=retry_transient_only,
)
def ingest_stage(cfg: RunConfig) -> dict[str, Any]:
    def fill(folder: Path) -> dict[str, Any]:
        result = ingest(cfg.data, root=data_root(), quarantine_path=folder / "quarantine.jsonl")
        write_pairs(result.pairs, folder / "pairs.parquet")
        (folder / "report.json").write_text(json.dumps(result.report, indent=1, default=str))
        splits = result.pairs["split"].value_counts().to_dict()
        return {
            "content_hash": result.fingerprint,
            "fingerprint": result.fingerprint,
            "pairs_file": "pairs.parquet",
            "quarantine_file": "quarantine.jsonl",
            "report": result.report,
            "splits": {str(k): int(v) for k, v in splits.items()},
            "sources": [s.path for s in cfg.data.train],
        }

    return build_artifact(cfg, STAGE, ingest_key(cfg), fill)
