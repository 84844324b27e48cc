"""The train stage's output as its manifest names it: the policy's folder and the training history.

Its own module so that the stages reading a trained policy (evaluate, compare, register, the sweep) do not import
`tasks.train`: a stage's cache key hashes the modules it imports (`tasks.artifacts.stage_modules`), and they re-run
when the trained weights change through the train manifest's `content_hash` among their inputs, not when the trainer's
code does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def policy_dir(train_manifest: dict[str, Any]) -> Path:
    """The trained policy's Hugging Face folder (LoRA merged)."""
    return Path(train_manifest["path"]) / train_manifest["model_subdir"]


def read_history(train_manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One metrics record per optimizer step of the whole run (resumed parts included)."""
    return read_history_file(Path(train_manifest["path"]) / train_manifest["history_file"])


def read_history_file(path: Path) -> list[dict[str, Any]]:
    """The records of a `history.jsonl` (none when the file is absent)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
