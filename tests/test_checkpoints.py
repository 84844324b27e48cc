"""Atomic checkpoints: complete-or-absent folders, manifest verification, newest-complete resume, pruning, RNG."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dpo_core.checkpoints import (
    CheckpointCorruptError,
    CheckpointWriteError,
    apply_checkpoint,
    capture_rng,
    list_checkpoints,
    load_model_tensors,
    newest_checkpoint,
    prune_checkpoints,
    read_checkpoint,
    restore_rng,
    resume_latest,
    save_checkpoint,
    write_atomic_dir,
)
from dpo_core.fileio import damage, is_complete, remove_stale_temps


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_save_read_apply_round_trip(tmp_path):
    model, opt, sched = _setup(0)
    path = save_checkpoint(tmp_path, 7, model=model, optimizer=opt, scheduler=sched, state={"history": [{"loss": 1.5}]})
    assert path.name == "step-000007" and is_complete(path)
    ckpt = read_checkpoint(path)
    assert ckpt.step == 7 and ckpt.state["history"] == [{"loss": 1.5}]

    other, opt2, sched2 = _setup(1)
    apply_checkpoint(ckpt, other, opt2, sched2)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)  # parameters and BatchNorm buffers
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_rng_states_round_trip():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_corrupt_newest_is_skipped_and_previous_used(tmp_path, caplog):
    model, opt, sched = _setup()
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, state={})
    newest = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, state={})
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    size = weights.stat().st_size
    assert damage(newest) == f"{weights} has {size} bytes, the manifest says {size + 10}"
    with pytest.raises(CheckpointCorruptError, match="the manifest says"):
        read_checkpoint(newest)
    assert newest_checkpoint(tmp_path).step == 1
    assert resume_latest(tmp_path, *_setup(3), device="cpu").step == 1
    assert "skipping checkpoint" in caplog.text

    flipped = save_checkpoint(tmp_path, 3, model=model, optimizer=opt, scheduler=sched, state={})
    data = bytearray((flipped / "state.json").read_bytes())
    data[2] ^= 1  # same size, different content
    (flipped / "state.json").write_bytes(bytes(data))
    assert not is_complete(flipped) and is_complete(flipped, hash_limit=0)  # sizes only: still complete
    assert newest_checkpoint(tmp_path).step == 1


def test_prune_keeps_newest_complete_ones(tmp_path):
    model, opt, sched = _setup()
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, state={}, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    (tmp_path / "step-000004").mkdir()  # no manifest: incomplete
    prune_checkpoints(tmp_path, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3], "an incomplete newer folder never evicts good ones"
    with pytest.raises(ValueError, match="keep"):
        prune_checkpoints(tmp_path, 0)


def test_failed_write_leaves_nothing_behind(tmp_path):
    def boom(folder):
        (folder / "partial.bin").write_bytes(b"x")
        raise OSError(28, "No space left on device")

    with pytest.raises(CheckpointWriteError, match="No space left"):
        write_atomic_dir(tmp_path / "step-000001", boom)
    assert list(tmp_path.iterdir()) == []

    def fine(folder):
        (folder / "a.txt").write_text("a")

    target = write_atomic_dir(tmp_path / "final", fine)
    assert (target / "a.txt").read_text() == "a" and is_complete(target)
    (tmp_path / ".step-000002.tmp-abc").mkdir()  # debris of a crash mid-write
    remove_stale_temps(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_weights_that_do_not_fit_are_a_clear_error(tmp_path):
    model, _, _ = _setup()
    with pytest.raises(CheckpointCorruptError, match="do not fit this model"):
        load_model_tensors(model, {"nonsense.weight": torch.zeros(1)})
    wrong = {n: torch.zeros(1) for n in model.state_dict() if "num_batches" not in n}
    wrong["1.num_batches_tracked"] = torch.tensor(0)
    with pytest.raises(CheckpointCorruptError, match="do not fit this model"):
        load_model_tensors(model, wrong)
