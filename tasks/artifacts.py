"""Content-addressed stage artifacts, cache keys and per-key locks (docs/architecture.md, docs/reliability.md).

Every stage writes `<state_dir>/artifacts/<stage>/<key>/` and returns a small JSON manifest. The key is a hash of
the stage's own inputs, the content hashes of the manifests it consumes and the *code version*: a hash of the source
files of every repository module the stage's task module `tasks.<stage>` imports, directly or not, found by parsing
the sources (so editing a module a stage runs invalidates that stage, and editing one it does not import leaves it
cached).

Folders are written under a temporary name and renamed into place when complete (a `MANIFEST.json` inside marks
them complete), so a half-written artifact is never seen. A per-key file lock (fcntl) makes two flow runs with the
same inputs wait for each other instead of computing the same thing twice; runs with different inputs never share
a folder. The flow refreshes a stage's Prefect cache entry when the folder behind it has gone, so deleting an artifact makes its
stage run again instead of returning a dangling path.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dpo_core.config import RunConfig, stable_hash
from dpo_core.fileio import MANIFEST, atomic_dir, damage, is_complete, read_manifest, remove_stale_temps
from dpo_core.fileio import sha256_file, write_manifest

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# The top-level packages of this repository: a stage's code version covers the modules of these it imports.
PROJECT_PACKAGES = ("dpo_core", "dpo_data", "data_contracts", "tracking", "tasks", "flows")


def state_dir(cfg: RunConfig) -> Path:
    path = cfg.resolved_state_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _module_file(name: str, root: Path) -> Path | None:
    """The source file of module `name` under `root` (a package's `__init__.py`), or None if it is not ours."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


_IMPORTS_MEMO: dict[tuple[str, bytes], frozenset[str]] = {}


def _imported_names(name: str, path: Path, source: bytes) -> frozenset[str]:
    """Every module name `source` may import, anywhere in the file (function bodies included), with its parents.

    `from a import b` yields `a` and `a.b` (b may be a submodule); relative imports are resolved against `name`."""
    memo = (name, hashlib.sha256(source).digest())
    if memo in _IMPORTS_MEMO:
        return _IMPORTS_MEMO[memo]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    with_parents = {".".join(mod.split(".")[:i]) for mod in found if mod for i in range(1, mod.count(".") + 2)}
    _IMPORTS_MEMO[memo] = frozenset(with_parents)
    return _IMPORTS_MEMO[memo]


def stage_modules(stage: str, root: Path = PROJECT_ROOT) -> dict[str, Path]:
    """`{module name: source file}` of every repository module that `tasks.<stage>` imports, directly or not.

    Found by parsing sources (nothing is imported). This covers the code torchrun runs for the train and reference
    stages: `tasks.launch` starts `python -m dpo_core.train_main`, which the stages reach through their imports of
    `TrainJob` / `ReferenceJob` (tests/test_artifacts.py checks the entry module is in both graphs)."""
    found: dict[str, Path] = {}
    todo = [f"tasks.{stage}"]
    while todo:
        name = todo.pop()
        path = _module_file(name, root)
        if name in found or path is None:
            continue
        found[name] = path
        todo.extend(_imported_names(name, path, path.read_bytes()))
    return found


def code_version(stage: str, root: Path = PROJECT_ROOT) -> str:
    """sha256 over the relative paths and bytes of the modules `stage` runs (`stage_modules`), 16 hex chars."""
    h = hashlib.sha256()
    for path in sorted(p.relative_to(root).as_posix() for p in stage_modules(stage, root).values()):
        h.update(path.encode())
        h.update((root / path).read_bytes())
    return h.hexdigest()[:16]


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
        _HASH_MEMO[memo] = sha256_file(f)
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


# files up to this size are re-hashed (sha256) whenever a cached artifact is used; larger ones (model weights) are
# checked by size only, which catches truncation but not a flipped byte
VERIFY_HASH_BYTES = 256 * 2**20


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
        why = damage(final, hash_limit=VERIFY_HASH_BYTES) if done is not None else None
        if done is not None and why is None:
            return done
        if why is not None:
            log.warning("rebuilding %s/%s: %s", stage, key, why)
        if final.exists():  # a folder without a manifest, or damaged since, is not ours to trust
            shutil.rmtree(final)
        remove_stale_temps(final.parent, key)  # left by a killed run; we hold the key's lock
        started = time.time()
        # a failed build keeps nothing half-written (a work_dir keeps its checkpoints)
        with atomic_dir(final, work_dir=work_dir) as folder:
            fields = fill(folder)
            if "content_hash" not in fields:
                raise ValueError(f"stage {stage} returned a manifest without content_hash")
            header = {"stage": stage, "key": key, "path": str(final), "seconds": round(time.time() - started, 3)}
            # every file's size and sha256, re-checked on each cache hit; not the resume-only checkpoints/ the train
            # stage drops once its artifact is in place
            manifest = write_manifest(folder, {**header, **fields}, exclude=("checkpoints/",))
        return manifest


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
    return not is_complete(artifact_dir(cfg, stage, key), hash_limit=VERIFY_HASH_BYTES)


def relpath_for_display(path: Path | str) -> str:
    try:
        return str(Path(path).resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)
