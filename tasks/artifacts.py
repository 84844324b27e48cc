"""Content-addressed stage artifacts, cache keys and per-key locks (docs/architecture.md, docs/reliability.md).

Every stage writes `<state_dir>/artifacts/<stage>/<key>/` and returns a small JSON manifest. The key is a hash of
the stage's own inputs, the content hashes of the manifests it consumes and the *code version*: a hash of the source
files of the modules the stage runs (so editing a dpo_core function a stage uses invalidates that stage, and editing
one it does not use leaves it cached).

Folders are written under a temporary name and renamed into place when complete (a `MANIFEST.json` inside marks
them complete), so a half-written artifact is never seen. A per-key file lock (fcntl) makes two flow runs with the
same inputs wait for each other instead of computing the same thing twice; runs with different inputs never share
a folder. The flow refreshes a stage's Prefect cache entry when the folder behind it has gone, so deleting an artifact makes its
stage run again instead of returning a dangling path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dpo_core.config import RunConfig, stable_hash

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
PROJECT_ROOT = Path(__file__).resolve().parents[1]

# The modules whose source each stage runs (its own task module and this one are always included).
STAGE_MODULES: dict[str, tuple[str, ...]] = {
    "ingest": ("dpo_data.formats", "dpo_core.config", "data_contracts"),
    "template": ("dpo_core.templating", "dpo_core.models", "data_contracts.tokenized"),
    "reference": ("dpo_core.reference", "dpo_core.logprobs", "dpo_core.batching", "dpo_core.models",
                  "data_contracts.reference"),
    "train": ("dpo_core.trainer", "dpo_core.losses", "dpo_core.logprobs", "dpo_core.batching",
              "dpo_core.checkpoints", "dpo_core.models"),
    "evaluate": ("dpo_core.evaluation", "dpo_core.logprobs", "dpo_core.batching", "dpo_core.models",
                 "data_contracts.evaluation"),
    "compare": ("dpo_core.evaluation", "dpo_core.generation", "dpo_core.judges", "dpo_core.logprobs",
                "dpo_core.templating", "dpo_core.models", "data_contracts.evaluation"),
}


def state_dir(cfg: RunConfig) -> Path:
    path = cfg.resolved_state_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _module_files(name: str) -> list[Path]:
    spec = importlib.util.find_spec(name)
    if spec is None:
        return []
    if spec.submodule_search_locations:  # a package: every .py file in it
        return sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.py"))
    return [Path(spec.origin)] if spec.origin else []


def code_version(stage: str) -> str:
    """sha256 over the sources of the modules `stage` runs (plus its task module and this file), 16 hex chars."""
    h = hashlib.sha256()
    names = (*STAGE_MODULES.get(stage, ()), f"tasks.{stage}", "tasks.artifacts")
    for name in names:
        for path in _module_files(name):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:16]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_hash(path: Path, patterns: Sequence[str] = ("*",)) -> str:
    """Content hash of a file or of every file under a folder (relative names + bytes); cached per (size, mtime)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for pat in patterns for p in path.rglob(pat) if p.is_file())
    h = hashlib.sha256()
    for f in files:
        if f.name.startswith(".") or f.name == MANIFEST:
            continue
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(_cached_file_hash(f).encode())
    return h.hexdigest()[:16]


_HASH_MEMO: dict[tuple[str, int, int], str] = {}


def _cached_file_hash(f: Path) -> str:
    st = f.stat()
    memo = (str(f.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _HASH_MEMO:
        _HASH_MEMO[memo] = file_sha256(f)
    return _HASH_MEMO[memo]


def stage_key(stage: str, inputs: Any, upstream: Sequence[dict[str, Any]] = ()) -> str:
    """The cache key of a stage: its own inputs + upstream content hashes + its code version."""
    return stable_hash(
        {
            "stage": stage,
            "inputs": inputs,
            "upstream": [u["content_hash"] for u in upstream],
            "code": code_version(stage),
        }
    )


def artifact_dir(cfg: RunConfig, stage: str, key: str) -> Path:
    return state_dir(cfg) / "artifacts" / stage / key


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


# files up to this size are re-hashed (sha256) whenever a cached artifact is used; larger ones (model weights) are
# checked by size only, which catches truncation but not a flipped byte
VERIFY_HASH_BYTES = 256 * 2**20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """`{relative path: {"bytes": n, "sha256": hex or None}}` of an artifact's files (not its manifest, not the
    resume-only `checkpoints/` a training folder drops once in place); the hash for files <= VERIFY_HASH_BYTES."""
    records = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file() or rel == MANIFEST or rel.startswith("checkpoints/"):
            continue
        size = path.stat().st_size
        records[rel] = {"bytes": size, "sha256": _sha256(path) if size <= VERIFY_HASH_BYTES else None}
    return records


def damage(folder: Path) -> str | None:
    """Why a cached artifact folder must not be trusted (no manifest, a file missing, resized or changed), or None.

    Manifests written before files were recorded (no `files` field) are trusted as before."""
    manifest = read_manifest(folder)
    if manifest is None:
        return f"{folder} has no readable {MANIFEST}"
    for rel, record in (manifest.get("files") or {}).items():
        path = folder / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {record['bytes']}"
        if record.get("sha256") and _sha256(path) != record["sha256"]:
            return f"{path} has changed since it was written (sha256 differs from the manifest)"
    return None


def is_complete(folder: Path) -> bool:
    return damage(folder) is None


@contextlib.contextmanager
def key_lock(cfg: RunConfig, stage: str, key: str) -> Iterator[None]:
    """An exclusive inter-process lock for one stage key (released when the holder exits, even by SIGKILL)."""
    lock_dir = state_dir(cfg) / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{stage}-{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_artifact(
    cfg: RunConfig, stage: str, key: str, fill: Callable[[Path], dict[str, Any]], *, work_dir: Path | None = None
) -> dict[str, Any]:
    """Return the manifest of `<stage>/<key>`, building it with `fill(folder)` unless it is already complete.

    `fill` writes its files into the folder it is given and returns the stage-specific manifest fields, which must
    include `content_hash`. `work_dir` is a persistent working folder (training keeps its checkpoints there so a
    re-run resumes); without it a fresh temporary folder is used and a crash leaves only garbage to sweep.
    """
    final = artifact_dir(cfg, stage, key)
    with key_lock(cfg, stage, key):
        done = read_manifest(final)
        why = damage(final) if done is not None else None
        if done is not None and why is None:
            return done
        if why is not None:
            log.warning("rebuilding %s/%s: %s", stage, key, why)
        if final.exists():  # a folder without a manifest, or damaged since, is not ours to trust
            shutil.rmtree(final)
        for stale in final.parent.glob(f".{key}.tmp-*"):  # left by a killed run; we hold the key's lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = work_dir or final.with_name(f".{key}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True, exist_ok=True)
        started = time.time()
        try:
            fields = fill(tmp)
        except BaseException:
            if work_dir is None:  # a failed build keeps nothing half-written (a work_dir keeps its checkpoints)
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if "content_hash" not in fields:
            raise ValueError(f"stage {stage} returned a manifest without content_hash")
        manifest = {
            "stage": stage,
            "key": key,
            "path": str(final),
            "seconds": round(time.time() - started, 3),
            **fields,
            "files": file_records(tmp),  # re-checked on every cache hit (`damage`)
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        _fsync_tree(tmp)
        os.replace(tmp, final)
        return manifest


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prefect_cache_key(stage: str, key_fn: Callable[..., str]) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect `cache_key_fn` computing the stage key from the task's parameters.

    The flow pairs it with `refresh_cache=True` when the folder behind the key is missing or incomplete (see
    `needs_refresh`), so a deleted artifact makes the stage run again instead of returning a dangling path.
    """

    def cache_key(_context: Any, parameters: dict[str, Any]) -> str:
        return f"{stage}-{key_fn(**parameters)}"

    return cache_key


def needs_refresh(cfg: RunConfig, stage: str, key: str) -> bool:
    """True when a cached result for `key` must not be trusted: its artifact folder is gone, incomplete or damaged."""
    return not is_complete(artifact_dir(cfg, stage, key))


def relpath_for_display(path: Path | str) -> str:
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)
