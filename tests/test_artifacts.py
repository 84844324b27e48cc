"""Stage artifacts: code-version keys, atomic folders, per-key locks (tasks/artifacts.py). No Prefect server."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from dpo_core.config import RunConfig
from tasks import artifacts


def test_code_version_changes_only_with_the_modules_a_stage_runs(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_core"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "used.py").write_text("def f():\n    return 1\n")
    (tmp_path / "unrelated_mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(artifacts.STAGE_MODULES, "fakestage", ("fake_core.used",))
    before = artifacts.code_version("fakestage")
    (tmp_path / "unrelated_mod.py").write_text("X = 2\n")
    assert artifacts.code_version("fakestage") == before
    (pkg / "used.py").write_text("def f():\n    return 2\n")
    assert artifacts.code_version("fakestage") != before
    sys.modules.pop("fake_core", None)


def test_stage_key_depends_on_inputs_and_upstream_hashes():
    a = artifacts.stage_key("ingest", {"x": 1}, [{"content_hash": "aa"}])
    assert a == artifacts.stage_key("ingest", {"x": 1}, [{"content_hash": "aa"}])
    assert a != artifacts.stage_key("ingest", {"x": 2}, [{"content_hash": "aa"}])
    assert a != artifacts.stage_key("ingest", {"x": 1}, [{"content_hash": "bb"}])


def test_build_artifact_is_atomic_and_built_once(tmp_path):
    cfg = RunConfig(state_dir=str(tmp_path))
    calls = []

    def fill(folder: Path) -> dict:
        calls.append(folder)
        (folder / "out.txt").write_text("hello")
        return {"content_hash": "h1"}

    m1 = artifacts.build_artifact(cfg, "stage", "k1", fill)
    m2 = artifacts.build_artifact(cfg, "stage", "k1", fill)
    assert m1 == m2 and len(calls) == 1
    final = Path(m1["path"])
    assert (final / "out.txt").read_text() == "hello" and artifacts.is_complete(final)
    assert not artifacts.needs_refresh(cfg, "stage", "k1")
    # no temporary folders are left behind
    assert [p.name for p in final.parent.iterdir()] == ["k1"]


def test_a_failed_build_leaves_nothing_that_looks_complete(tmp_path):
    cfg = RunConfig(state_dir=str(tmp_path))

    def boom(folder: Path) -> dict:
        (folder / "half.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        artifacts.build_artifact(cfg, "stage", "k2", boom)
    assert artifacts.needs_refresh(cfg, "stage", "k2")
    assert not artifacts.artifact_dir(cfg, "stage", "k2").exists()


def test_manifest_without_content_hash_is_refused(tmp_path):
    cfg = RunConfig(state_dir=str(tmp_path))
    with pytest.raises(ValueError, match="content_hash"):
        artifacts.build_artifact(cfg, "stage", "k3", lambda folder: {"rows": 1})


def test_same_key_builds_wait_for_each_other(tmp_path):
    """Two concurrent builders of one key: the second waits for the lock and reuses the first one's folder."""
    cfg = RunConfig(state_dir=str(tmp_path))
    calls, results = [], []

    def slow_fill(folder: Path) -> dict:
        calls.append(time.monotonic())
        time.sleep(0.5)
        return {"content_hash": "same"}

    threads = [threading.Thread(target=lambda: results.append(artifacts.build_artifact(cfg, "s", "k", slow_fill)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]


def test_tree_hash_follows_content(tmp_path):
    (tmp_path / "a.txt").write_text("1")
    h1 = artifacts.tree_hash(tmp_path)
    (tmp_path / "a.txt").write_text("2")
    assert artifacts.tree_hash(tmp_path) != h1


def test_a_damaged_cached_artifact_is_detected_and_rebuilt(tmp_path, monkeypatch):
    """A file changed, truncated or deleted inside a completed artifact is not returned as a cache hit."""
    cfg = RunConfig(state_dir=str(tmp_path))
    calls = []

    def fill(folder: Path) -> dict:
        calls.append(folder)
        (folder / "table.parquet").write_bytes(b"PAR1" + bytes(range(40)) + b"PAR1")  # 48 bytes
        (folder / "big.bin").write_bytes(b"x" * 64)
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "resume-only.pt").write_bytes(b"dropped once in place")
        return {"content_hash": "h"}

    monkeypatch.setattr(artifacts, "VERIFY_HASH_BYTES", 50)  # big.bin (64 bytes) is checked by size only
    final = Path(artifacts.build_artifact(cfg, "stage", "k", fill)["path"])
    manifest = artifacts.read_manifest(final)
    assert set(manifest["files"]) == {"table.parquet", "big.bin"}  # not the manifest, not checkpoints/
    assert manifest["files"]["big.bin"]["sha256"] is None and manifest["files"]["table.parquet"]["sha256"]
    import shutil

    shutil.rmtree(final / "checkpoints")  # what the train stage does once its artifact is in place: still complete
    assert not artifacts.needs_refresh(cfg, "stage", "k")

    damaged = bytearray((final / "table.parquet").read_bytes())
    damaged[10] ^= 0xFF  # one flipped byte, same size
    (final / "table.parquet").write_bytes(bytes(damaged))
    assert "has changed since it was written" in artifacts.damage(final)
    assert artifacts.needs_refresh(cfg, "stage", "k")
    artifacts.build_artifact(cfg, "stage", "k", fill)
    assert len(calls) == 2 and artifacts.damage(final) is None  # rebuilt in place

    (final / "big.bin").write_bytes(b"x" * 10)  # truncated
    assert "has 10 bytes, the manifest says 64" in artifacts.damage(final)
    (final / "big.bin").unlink()
    assert "missing" in artifacts.damage(final)
    artifacts.build_artifact(cfg, "stage", "k", fill)
    assert len(calls) == 3 and artifacts.damage(final) is None
