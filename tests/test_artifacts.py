"""Stage artifacts: code-version keys, atomic folders, per-key locks (tasks/artifacts.py). No Prefect server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dpo_core.config import RunConfig
from dpo_core.fileio import damage, is_complete, read_manifest
from tasks import artifacts


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_stage_modules_follow_every_kind_of_import(tmp_path):
    """Imports inside functions, `from pkg import submodule`, relative imports and parent packages are all followed;
    modules outside the repository's packages and modules nothing imports are not."""
    _write(tmp_path / "tasks" / "__init__.py", "")
    _write(tmp_path / "tasks" / "fakestage.py",
           "import json\nfrom dpo_core import direct\n\ndef run():\n    from .helper import go\n    return go()\n")
    _write(tmp_path / "tasks" / "helper.py", "import dpo_data.deep.leaf\n\ndef go():\n    return 1\n")
    _write(tmp_path / "dpo_core" / "__init__.py", "")
    _write(tmp_path / "dpo_core" / "direct.py", "X = 1\n")
    _write(tmp_path / "dpo_core" / "unused.py", "X = 1\n")
    _write(tmp_path / "dpo_data" / "__init__.py", "")
    _write(tmp_path / "dpo_data" / "deep" / "__init__.py", "")
    _write(tmp_path / "dpo_data" / "deep" / "leaf.py", "from . import sibling\n")
    _write(tmp_path / "dpo_data" / "deep" / "sibling.py", "Y = 1\n")
    assert set(artifacts.stage_modules("fakestage", tmp_path)) == {
        "tasks", "tasks.fakestage", "tasks.helper", "dpo_core", "dpo_core.direct",
        "dpo_data", "dpo_data.deep", "dpo_data.deep.leaf", "dpo_data.deep.sibling"}

    before = artifacts.code_version("fakestage", tmp_path)
    assert artifacts.code_version("fakestage", tmp_path) == before  # stable for unchanged sources
    _write(tmp_path / "dpo_core" / "unused.py", "X = 2\n")
    assert artifacts.code_version("fakestage", tmp_path) == before
    _write(tmp_path / "dpo_data" / "deep" / "sibling.py", "Y = 2\n")
    assert artifacts.code_version("fakestage", tmp_path) != before


def _torchrun_entry() -> str:
    """The module `python -m` runs on every torchrun rank (the one after the command's last `-m`)."""
    from tasks.launch import torchrun_command

    command = torchrun_command(Path("job.json"), 2)
    return command[len(command) - command[::-1].index("-m")]


def test_the_train_stage_graph_holds_the_code_it_runs_in_process_and_under_torchrun():
    train = artifacts.stage_modules("train")
    assert {"dpo_core.distributed", "dpo_core.fsdp", "dpo_core.reference", "dpo_core.train_main",
            "tasks.launch"} <= set(train)
    entry = _torchrun_entry()
    assert entry in train and entry in artifacts.stage_modules("reference")


STAGES = ("ingest", "judge", "template", "reference", "train", "evaluate", "compare")


def _keys_in_subprocess(root: Path) -> dict[str, str]:
    code = "import json\nfrom tasks.artifacts import code_version\n" \
           f"print(json.dumps({{s: code_version(s) for s in {STAGES!r}}}))"
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("edited", ["dpo_core/distributed.py", "torchrun entry"])
def test_editing_a_transitively_imported_module_changes_exactly_the_keys_of_the_stages_that_import_it(
        tmp_path, edited):
    """A copy of the repository's packages: edit a module the train stage (or the reference stage's torchrun path)
    imports only transitively; a fresh process sees new keys for the stages whose graph holds it, the old ones
    elsewhere."""
    for package in artifacts.PROJECT_PACKAGES:
        shutil.copytree(artifacts.PROJECT_ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    if edited == "torchrun entry":
        edited = _torchrun_entry().replace(".", "/") + ".py"
    module = edited.removesuffix(".py").replace("/", ".")
    importers = {s for s in STAGES if module in artifacts.stage_modules(s, tmp_path)}
    assert "train" in importers and "reference" in importers and "ingest" not in importers
    assert module not in {"tasks.train", "tasks.reference"}  # imported only transitively

    before = _keys_in_subprocess(tmp_path)
    with open(tmp_path / edited, "a") as handle:
        handle.write("\n\ndef _probe_edit() -> int:\n    return 1\n")
    after = _keys_in_subprocess(tmp_path)
    assert {s for s in STAGES if after[s] != before[s]} == importers
    assert {s for s in STAGES if after[s] == before[s]} == set(STAGES) - importers


def test_a_trainer_edit_re_runs_train_but_leaves_the_code_of_evaluate_and_compare(tmp_path):
    """evaluate and compare read the trained policy through `tasks.train_output`, not `tasks.train`: a trainer edit
    changes the train stage's code version only; they re-run when the weights change, through the train manifest's
    content hash among their upstream hashes."""
    for package in artifacts.PROJECT_PACKAGES:
        shutil.copytree(artifacts.PROJECT_ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    stages = ("train", "reference", "evaluate", "compare", "register")
    before = {s: artifacts.code_version(s, tmp_path) for s in stages}
    with open(tmp_path / "dpo_core" / "trainer.py", "a") as handle:
        handle.write("\n\ndef _probe_edit() -> int:\n    return 1\n")
    after = {s: artifacts.code_version(s, tmp_path) for s in stages}
    assert {s for s in stages if after[s] != before[s]} == {"train", "reference"}  # reference runs train_main's path
    assert artifacts.stage_key("evaluate", {}, [{"content_hash": "weights-1"}]) != artifacts.stage_key(
        "evaluate", {}, [{"content_hash": "weights-2"}])


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
    assert (final / "out.txt").read_text() == "hello" and is_complete(final)
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
    manifest = read_manifest(final)
    assert set(manifest["files"]) == {"table.parquet", "big.bin"}  # not the manifest, not checkpoints/
    assert manifest["files"]["big.bin"] == {"bytes": 64, "sha256": hashlib.sha256(b"x" * 64).hexdigest()}

    shutil.rmtree(final / "checkpoints")  # what the train stage does once its artifact is in place: still complete
    assert not artifacts.needs_refresh(cfg, "stage", "k")

    def why() -> str | None:
        return damage(final, hash_limit=artifacts.VERIFY_HASH_BYTES)

    (final / "big.bin").write_bytes(b"y" * 64)  # same size: above the hash limit, not re-hashed on a cache hit
    assert why() is None
    damaged = bytearray((final / "table.parquet").read_bytes())
    damaged[10] ^= 0xFF  # one flipped byte, same size
    (final / "table.parquet").write_bytes(bytes(damaged))
    assert "has changed since it was written" in why()
    assert artifacts.needs_refresh(cfg, "stage", "k")
    artifacts.build_artifact(cfg, "stage", "k", fill)
    assert len(calls) == 2 and why() is None  # rebuilt in place

    (final / "big.bin").write_bytes(b"x" * 10)  # truncated
    assert "has 10 bytes, the manifest says 64" in why()
    (final / "big.bin").unlink()
    assert "missing" in why()
    artifacts.build_artifact(cfg, "stage", "k", fill)
    assert len(calls) == 3 and why() is None
