"""Stage 1: resolve the policy's base model to a local folder (materialising the embedded GGUF once)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.tasks import exponential_backoff

from dpo_core.config import RunConfig
from dpo_core.models import default_model_cache, resolve_model_path
from tasks.artifacts import state_dir, tree_hash
from tasks.common import retry_transient_only

MODEL_FILES = ("*.json", "*.safetensors", "*.jinja", "*.model", "*.txt")  # what a model's content hash covers


def model_cache_dir(cfg: RunConfig) -> Path:
    """$DPO_MODEL_CACHE when set (tests share one), else `<state_dir>/models`."""
    import os

    return default_model_cache() if os.environ.get("DPO_MODEL_CACHE") else state_dir(cfg) / "models"


@task(name="materialize-model", retries=2, retry_delay_seconds=exponential_backoff(2), retry_condition_fn=retry_transient_only)
def materialize_model(cfg: RunConfig) -> dict[str, Any]:
    """A manifest with the model folder and a content hash of its files (weights, config, tokenizer)."""
    path = resolve_model_path(cfg.model, model_cache_dir(cfg))
    if isinstance(path, Path) or Path(str(path)).is_dir():
        folder = Path(path)
        content = tree_hash(folder, MODEL_FILES)
        return {"stage": "materialize", "model_dir": str(folder), "name": cfg.model.name_or_path,
                "content_hash": content}
    # a hub id (online only): the id and revision are its identity
    return {"stage": "materialize", "model_dir": str(path), "name": cfg.model.name_or_path,
            "content_hash": f"hub:{path}@{cfg.model.revision or 'main'}"}
