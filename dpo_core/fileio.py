"""Atomic writes, file hashes and folder manifests: how every module writes a file or a folder that other code reads.

- ``atomic_file(path, mode)``: write to ``.<name>.tmp-XXXXXXXX`` beside ``path``, fsync, ``os.replace`` onto it.
- ``atomic_dir(final)``: fill a temporary sibling folder ``.<name>.tmp-XXXXXXXX``; on success every file in it is
  fsynced and the folder renamed to ``final`` (replacing an older one).
- ``sha256_file(path)``: the hex sha256 of a file's bytes.
- a manifest ``MANIFEST.json`` in a folder: the caller's fields plus
  ``files: {relative path: {"bytes": n, "sha256": hex}}`` for every file in it, written after them
  (``write_manifest``); ``damage(folder)`` says why a folder does not match its manifest (None when it does),
  ``is_complete(folder)`` is ``damage(folder) is None``.

A crash before the rename leaves the target as it was (absent, or its previous complete version) and a dot-named
temporary beside it, which ``remove_stale_temps`` deletes. Standard library only: every package may import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

MANIFEST = "MANIFEST.json"
_TMP = ".tmp-"


def _temp_sibling(final: Path) -> Path:
    """A fresh name beside `final` for its temporary: `.<name>.tmp-<8 hex>`."""
    return final.with_name(f".{final.name}{_TMP}{secrets.token_hex(4)}")


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename into it) durable; a no-op where the filesystem refuses."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", *, encoding: str = "utf-8") -> Iterator[IO[Any]]:
    """Yield a handle open for writing (`mode` "w" or "wb") on a temporary beside `path`; on success it is fsynced
    and renamed onto `path`. On an exception `path` keeps what it held and the temporary is removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_file writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # permissions as for a plain open()
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    for path in [*(p for p in folder.rglob("*") if p.is_dir()), folder]:
        fsync_dir(path)


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, work_dir: str | Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder beside `final`; on success it is fsynced and renamed to `final`. On an
    exception `final` is left as it was and the temporary folder is removed.

    An existing `final` is moved aside just before the rename (a folder cannot be renamed onto a non-empty one):
    a crash between the two renames leaves no `final` at all, never a partial one.

    `work_dir`: a folder to fill instead of a fresh temporary (same filesystem), kept on an exception so a later
    attempt can resume from what it holds (the train stage keeps its checkpoints there)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(work_dir) if work_dir is not None else _temp_sibling(final)
    tmp.mkdir(parents=True, exist_ok=work_dir is not None)
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            old = _temp_sibling(final)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        if work_dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)


def remove_stale_temps(folder: str | Path, name: str = "*") -> None:
    """Delete the temporaries a crashed `atomic_file` / `atomic_dir` left in `folder` for targets called `name`
    (every target by default). Only for a folder no other process is writing into at the same time."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for path in folder.glob(f".{name}{_TMP}*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------ manifests


def file_records(folder: Path, exclude: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """`{relative path: {"bytes": n, "sha256": hex}}` of every file under `folder` except its manifest and paths
    that start with one of `exclude` (e.g. "checkpoints/")."""
    records = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel != MANIFEST and not rel.startswith(tuple(exclude)):
            records[rel] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    return records


def write_manifest(folder: str | Path, fields: Mapping[str, Any] | None = None, *,
                   exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Write `folder/MANIFEST.json` = `fields` + the `files` record of what the folder holds now; return it.

    Call it after the folder's last file is written: `damage` then checks the folder against it."""
    folder = Path(folder)
    fields = dict(fields or {})
    if "files" in fields:
        raise ValueError("manifest fields may not be called 'files': that entry records the folder's files")
    manifest = {**fields, "files": file_records(folder, exclude)}
    with atomic_file(folder / MANIFEST) as handle:
        handle.write(json.dumps(manifest, indent=1, default=str))
    return manifest


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of `folder`, or None when it has none or it cannot be parsed."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def damage(folder: str | Path, *, hash_limit: int | None = None) -> str | None:
    """Why `folder` does not match its manifest (none, a file missing, resized or changed), or None when it does.

    Every file's size is checked; its sha256 too unless it is larger than `hash_limit` bytes (None: always)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return f"{folder} has no readable {MANIFEST}"
    for rel, record in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"{path} has {size} bytes, the manifest says {record['bytes']}"
        if (hash_limit is None or size <= hash_limit) and sha256_file(path) != record["sha256"]:
            return f"{path} has changed since it was written (sha256 differs from the manifest)"
    return None


def is_complete(folder: str | Path, *, hash_limit: int | None = None) -> bool:
    """True when `folder` has a manifest and every file matches it (see `damage`)."""
    return damage(folder, hash_limit=hash_limit) is None
