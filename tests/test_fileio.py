"""Atomic files and folders, sha256, manifests (dpo_core/fileio.py), including a crash between write and rename."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dpo_core import fileio

REPO = Path(__file__).resolve().parents[1]


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_file_writes_text_and_bytes_and_replaces_the_target(tmp_path):
    target = tmp_path / "sub" / "out.json"
    with fileio.atomic_file(target) as handle:
        handle.write("é1")
    assert target.read_text(encoding="utf-8") == "é1"
    with fileio.atomic_file(target, "wb") as handle:
        handle.write(b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _temps(target.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # like a plain open(), not mkstemp's 0600
    with pytest.raises(ValueError, match="mode must be 'w' or 'wb'"):
        with fileio.atomic_file(target, "a"):
            pass


def test_an_exception_inside_atomic_file_keeps_the_old_target_and_no_temporary(tmp_path):
    target = tmp_path / "table.parquet"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk hiccup"):
        with fileio.atomic_file(target, "wb") as handle:
            handle.write(b"half of the new")
            raise RuntimeError("disk hiccup")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["table.parquet"]


def test_an_exception_inside_atomic_dir_keeps_the_old_folder_and_no_temporary(tmp_path):
    final = tmp_path / "step-000001"
    with fileio.atomic_dir(final) as folder:
        (folder / "a.txt").write_text("old")
    with pytest.raises(OSError, match="No space"):
        with fileio.atomic_dir(final) as folder:
            (folder / "a.txt").write_text("new, half")
            raise OSError(28, "No space left on device")
    assert (final / "a.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["step-000001"]


def test_atomic_dir_replaces_an_existing_folder_whole(tmp_path):
    final = tmp_path / "final"
    with fileio.atomic_dir(final) as folder:
        (folder / "old-only.txt").write_text("1")
    with fileio.atomic_dir(final) as folder:
        (folder / "new.txt").write_text("2")
    assert _visible(final) == ["new.txt"] and os.listdir(tmp_path) == ["final"]


def test_atomic_dir_keeps_a_work_dir_on_failure_and_renames_it_on_success(tmp_path):
    final, work = tmp_path / "k", tmp_path / ".k.work"
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_dir(final, work_dir=work) as folder:
            (folder / "checkpoint").write_text("step 3")
            raise KeyboardInterrupt
    assert (work / "checkpoint").read_text() == "step 3" and not final.exists()
    with fileio.atomic_dir(final, work_dir=work) as folder:
        assert (folder / "checkpoint").read_text() == "step 3"  # the retry resumes from what it kept
        (folder / "model").write_text("done")
    assert _visible(final) == ["checkpoint", "model"] and not work.exists()


# A child process writes a new version, then dies (os._exit: no cleanup, no finally) at the first rename that touches
# the target: what a SIGKILL between write and rename leaves behind.
_CRASH = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from dpo_core import fileio

    kind, target = sys.argv[1], Path(sys.argv[2])
    rename = os.replace

    def rename_or_die(src, dst):
        if target in (Path(src), Path(dst)):
            os._exit(9)
        rename(src, dst)

    os.replace = rename_or_die
    if kind == "file":
        with fileio.atomic_file(target) as handle:
            handle.write("new " * 1000)
    else:
        with fileio.atomic_dir(target) as folder:
            (folder / "a.txt").write_text("new")
            fileio.write_manifest(folder, {"version": 2})
""")


def _crash_while_writing(kind: str, target: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _CRASH, kind, str(target)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 9, done.stderr


def test_a_crash_between_write_and_rename_leaves_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    target.write_text('{"version": 1}')
    _crash_while_writing("file", target)
    assert json.loads(target.read_text()) == {"version": 1}  # intact, never partly overwritten
    assert _visible(tmp_path) == ["result.json"]
    debris = _temps(tmp_path)
    assert len(debris) == 1 and debris[0].startswith(".result.json.tmp-")
    assert (tmp_path / debris[0]).read_text() == "new " * 1000  # the new bytes were written, only not renamed
    fileio.remove_stale_temps(tmp_path)
    assert os.listdir(tmp_path) == ["result.json"]


@pytest.mark.parametrize("existing", [True, False], ids=["replacing", "new"])
def test_a_crash_between_write_and_rename_leaves_the_old_folder_or_none(tmp_path, existing):
    final = tmp_path / "artifact"
    if existing:
        with fileio.atomic_dir(final) as folder:
            (folder / "a.txt").write_text("old")
            fileio.write_manifest(folder, {"version": 1})
    _crash_while_writing("dir", final)
    if existing:
        assert (final / "a.txt").read_text() == "old"
        assert fileio.read_manifest(final)["version"] == 1 and fileio.is_complete(final)
    assert _visible(tmp_path) == (["artifact"] if existing else [])
    debris = _temps(tmp_path)
    assert len(debris) == 1 and fileio.read_manifest(tmp_path / debris[0])["version"] == 2  # written, not renamed
    fileio.remove_stale_temps(tmp_path, "other-name")  # another target's temporaries only: this one stays
    assert _temps(tmp_path) == debris
    fileio.remove_stale_temps(tmp_path, "artifact")
    assert _temps(tmp_path) == []


def test_sha256_file_matches_hashlib(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read block
    (tmp_path / "blob").write_bytes(data)
    assert fileio.sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def test_the_manifest_records_every_file_and_catches_each_kind_of_damage(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"b" * 100)
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "resume.pt").write_bytes(b"r")
    written = fileio.write_manifest(tmp_path, {"stage": "s", "rows": 3}, exclude=("checkpoints/",))
    manifest = fileio.read_manifest(tmp_path)
    assert manifest == json.loads(json.dumps(written))
    assert manifest["stage"] == "s" and manifest["rows"] == 3
    assert manifest["files"] == {
        "a.txt": {"bytes": 1, "sha256": hashlib.sha256(b"a").hexdigest()},
        "sub/b.bin": {"bytes": 100, "sha256": hashlib.sha256(b"b" * 100).hexdigest()},
    }
    assert fileio.damage(tmp_path) is None and fileio.is_complete(tmp_path)

    (tmp_path / "sub" / "b.bin").write_bytes(b"c" * 100)  # same size, other bytes
    assert fileio.damage(tmp_path) == f"{tmp_path / 'sub' / 'b.bin'} has changed since it was written " \
                                      "(sha256 differs from the manifest)"
    assert fileio.is_complete(tmp_path, hash_limit=99)  # above the limit: sizes only
    assert not fileio.is_complete(tmp_path, hash_limit=100)
    (tmp_path / "sub" / "b.bin").write_bytes(b"b" * 60)
    assert fileio.damage(tmp_path, hash_limit=0) == f"{tmp_path / 'sub' / 'b.bin'} has 60 bytes, the manifest says 100"
    (tmp_path / "sub" / "b.bin").unlink()
    assert fileio.damage(tmp_path) == f"{tmp_path / 'sub' / 'b.bin'} is missing"
    (tmp_path / fileio.MANIFEST).write_text("{not json")
    assert fileio.damage(tmp_path) == f"{tmp_path} has no readable {fileio.MANIFEST}"
    assert fileio.damage(tmp_path / "nowhere") == f"{tmp_path / 'nowhere'} has no readable {fileio.MANIFEST}"
    with pytest.raises(ValueError, match="'files'"):
        fileio.write_manifest(tmp_path, {"files": []})
