"""Stage 2: read every configured source, convert to canonical pairs (and unpaired rows for an unpaired objective:
KTO), validate, quarantine, split, select, fingerprint.

The promotion gate's pairs are taken first: `registry.gate_set` when configured (split `gate`), else the eval split
stored with the champion when one is given (`gate`, the manifest of tasks.champion.pinned_gate_stage; it becomes the
`eval` split), else the run's own eval split is the gate (and gets stored with the version it registers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prefect import task
from prefect.tasks import exponential_backoff

import pandas as pd

from dpo_data.formats import list_data_files
from dpo_data.ingest import GATE_SPLIT, ingest, pair_set_id, read_pairs, read_unpaired, write_pairs, write_unpaired
from dpo_core.config import RunConfig
from tasks.artifacts import PROJECT_ROOT, build_artifact, prefect_cache_key, stage_key, tree_hash
from tasks.common import retry_transient_only

STAGE = "ingest"


def data_root() -> Path:
    """Relative data paths are resolved against $DPO_DATA_ROOT, else the project folder."""
    return Path(os.environ.get("DPO_DATA_ROOT") or PROJECT_ROOT)


def _source_hashes(cfg: RunConfig) -> dict[str, str]:
    sources = [*cfg.data.train, *(cfg.data.eval or []), *cfg.data.extra_eval.values(),
               *([cfg.registry.gate_set] if cfg.registry.gate_set is not None else [])]
    out = {}
    for src in sources:
        path = data_root() / src.path
        # a hub dataset id (or a missing path, which ingest reports clearly) is identified by its name
        out[src.path] = tree_hash(path) if path.exists() else f"missing-or-hub:{src.path}"
    return out


def _arrival_stamps(cfg: RunConfig) -> dict[str, int]:
    """Modification times of the train files: with data.select=newest they decide which pairs train."""
    if cfg.data.select != "newest":
        return {}
    stamps = {}
    for src in cfg.data.train:
        path = data_root() / src.path
        files = list_data_files(path) if path.is_dir() else [path] if path.is_file() else []
        stamps.update({str(f): f.stat().st_mtime_ns for f in files})
    return stamps


def ingest_key(cfg: RunConfig, gate: dict[str, Any] | None = None) -> str:
    inputs = {"data": cfg.data.model_dump(mode="json"), "sources": _source_hashes(cfg),
              "arrival": _arrival_stamps(cfg), "unpaired": cfg.train.is_unpaired(),
              "gate_set": cfg.registry.gate_set.model_dump(mode="json") if cfg.registry.gate_set else None}
    return stage_key(STAGE, inputs, [gate] if gate is not None else [])




@task(
    name="ingest",
    cache_key_fn=prefect_cache_key(STAGE, ingest_key),
    persist_result=True,
    retries=2,
    retry_delay_seconds=exponential_backoff(2),
    retry_condition_fn=retry_transient_only,
)
def ingest_stage(cfg: RunConfig, gate: dict[str, Any] | None = None) -> dict[str, Any]:
    def fill(folder: Path) -> dict[str, Any]:
        pinned = read_pairs(Path(gate["path"]) / gate["pairs_file"]) if gate is not None else None
        result = ingest(cfg.data, root=data_root(), quarantine_path=folder / "quarantine.jsonl",
                        gate_source=cfg.registry.gate_set, pinned_eval=pinned,
                        pinned_origin=gate["origin"] if gate is not None else "pinned",
                        unpaired=cfg.train.is_unpaired())
        write_pairs(result.pairs, folder / "pairs.parquet")
        write_unpaired(result.unpaired, folder / "unpaired.parquet")
        (folder / "report.json").write_text(json.dumps(result.report, indent=1, default=str))
        splits = result.pairs["split"].value_counts().to_dict()
        # the promotion gate scores on split `gate` when there is one, else on `eval` (pinned when registered)
        gate_split = GATE_SPLIT if splits.get(GATE_SPLIT) else "eval"
        return {
            "content_hash": result.fingerprint,
            "fingerprint": result.fingerprint,
            "train_fingerprint": result.train_fingerprint,
            "gate_split": gate_split,
            "gate_set_id": pair_set_id(result.pairs.loc[result.pairs["split"] == gate_split, "pair_id"]),
            "pairs_file": "pairs.parquet",
            # unpaired rows (an unpaired objective's training rows, and unpaired held-out rows); empty otherwise
            "unpaired_file": "unpaired.parquet",
            "unpaired_splits": {str(k): int(v) for k, v in result.unpaired["split"].value_counts().items()},
            "quarantine_file": "quarantine.jsonl",
            "report": result.report,
            "splits": {str(k): int(v) for k, v in splits.items()},
            "sources": [s.path for s in cfg.data.train],
        }

    return build_artifact(cfg, STAGE, ingest_key(cfg, gate), fill)


def unpaired_rows(pairs: dict[str, Any]) -> pd.DataFrame:
    """The canonical unpaired rows of an ingest manifest (every split)."""
    return read_unpaired(Path(pairs["path"]) / pairs["unpaired_file"])


def split_pairs(pairs: dict[str, Any], split: str) -> pd.DataFrame:
    """The canonical pairs of one split of an ingest manifest."""
    table = read_pairs(Path(pairs["path"]) / pairs["pairs_file"])
    return table[table["split"] == split].reset_index(drop=True)
