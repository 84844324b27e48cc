"""Atomic training checkpoints: write to a temporary folder, fsync, rename into place; load the newest complete one.

A checkpoint is a folder `<root>/step-000008/` holding

    model.safetensors   trainable parameters (LoRA adapters) or every parameter and persistent buffer (full model)
    optimizer.pt        optimizer.state_dict()          (torch.save; read back with weights_only=True)
    scheduler.pt        scheduler.state_dict()
    rng.pt              torch / cuda / numpy / python RNG states
    state.json          step, data position, metric history and whatever else the trainer records
    MANIFEST.json       every file's size and sha256 (`dpo_core.fileio.write_manifest`), written last

It is assembled in `<root>/.step-000008.tmp-XXXXXXXX/` and renamed into place (`dpo_core.fileio.atomic_dir`), so a
crash never leaves a half-written folder under a checkpoint name. A folder whose files no longer match its manifest
(truncated, bit-flipped) or that fails to load is skipped with a warning and the previous complete checkpoint is used
instead.

`write_atomic_dir` writes any folder the same way (the trainer's `final/` model folder uses it).
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dpo_core.fileio import atomic_dir, damage, is_complete, write_manifest

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointWriteError(OSError):
    """Writing a checkpoint (or the final folder) failed; the message names the folder. Earlier ones are intact."""


class CheckpointCorruptError(ValueError):
    """A checkpoint folder does not match its manifest or cannot be loaded."""


# --------------------------------------------------------------------------------------------------- atomic folders


def write_atomic_dir(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create `target` atomically: `fill(tmp)` writes into a temporary sibling, a manifest is added, then rename.

    On any error the temporary folder is removed, `target` is left as it was, and an OSError is re-raised as
    CheckpointWriteError naming `target` (other exceptions propagate unchanged).
    """
    target = Path(target)
    try:
        with atomic_dir(target) as tmp:
            fill(tmp)
            write_manifest(tmp)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CheckpointWriteError(exc.errno, f"could not write {target}: {reason}") from exc
    return target


# ----------------------------------------------------------------------------------------------------- model tensors


def is_peft_model(model: torch.nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint needs of the model: trainable parameters for a peft model, else parameters + buffers.

    Tied parameters (e.g. embeddings shared with the LM head) appear once, under their first name.
    """
    if is_peft_model(model):
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    state = model.state_dict()
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers() if n in state]
    return {n: state[n].detach() for n in names}


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({n: t.cpu().contiguous() for n, t in tensors.items()}, str(path))


def check_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """CheckpointCorruptError unless `tensors` has exactly the names `model_tensors(model)` has."""
    expected = set(model_tensors(model))
    unknown = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    if unknown or missing:
        raise CheckpointCorruptError(
            f"checkpoint weights do not fit this model: {len(unknown)} unknown names (e.g. {unknown[:2]}), "
            f"{len(missing)} missing (e.g. {missing[:2]})"
        )


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` into `model`; every name must exist there (a clear error otherwise)."""
    check_model_tensors(model, tensors)
    try:
        model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise CheckpointCorruptError(f"checkpoint weights do not fit this model: {str(exc).splitlines()[0]}") from exc


# ----------------------------------------------------------------------------------------------------------- RNG


def capture_rng() -> dict[str, Any]:
    """All RNG states that training touches, in a form torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))


# ------------------------------------------------------------------------------------------------------ checkpoints


@dataclass
class Checkpoint:
    """A checkpoint read back from disk (verified against its manifest), not yet applied to anything."""

    path: Path
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every folder named like a checkpoint under `root`, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int | None = None,
    protect: int | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write `<root>/step-<step>/` atomically; then keep only the newest `keep` complete checkpoints (and the one of
    step `protect`, e.g. the best one so far on validation).

    `state` must be JSON-serialisable (step, data position, metric history, ...). `tensors` / `optimizer_state`
    replace `model_tensors(model)` / `optimizer.state_dict()` when the caller gathered them itself (FSDP: the
    consolidated state, see `dpo_core.fsdp`); the files are the same either way. Raises CheckpointWriteError
    naming the folder when the disk is full or any other I/O error happens; earlier checkpoints stay intact.
    """
    target = checkpoint_dir(root, step)

    def fill(tmp: Path) -> None:
        _save_tensors(model_tensors(model) if tensors is None else tensors, tmp / MODEL_FILE)
        torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / OPTIMIZER_FILE)
        torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        torch.save(capture_rng(), tmp / RNG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))

    write_atomic_dir(target, fill)
    if keep is not None:
        prune_checkpoints(root, keep, protect)
    return target


def prune_checkpoints(root: Path, keep: int, protect: int | None = None) -> None:
    """Keep the newest `keep` complete checkpoints (size check against the manifest) and the one of step `protect`;
    delete every other folder.

    A damaged newer folder therefore never causes the last good checkpoint to be deleted.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    found = list_checkpoints(root)
    complete = [path for _, path in found if is_complete(path, hash_limit=0)]
    kept = set(complete[-keep:]) | ({checkpoint_dir(root, protect)} if protect is not None else set())
    for _, path in found:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def _verify(path: Path) -> None:
    """CheckpointCorruptError unless every file of the checkpoint at `path` matches its manifest (sizes and sha256)."""
    why = damage(path)
    if why is not None:
        raise CheckpointCorruptError(why)


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> Checkpoint:
    """Verify `path` against its manifest and read every file; CheckpointCorruptError if anything is off."""
    path = Path(path)
    _verify(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
        return Checkpoint(
            path=path,
            step=int(state["step"]),
            model=load_file(str(path / MODEL_FILE), device=str(device)),
            optimizer=torch.load(path / OPTIMIZER_FILE, map_location=device, weights_only=True),
            scheduler=torch.load(path / SCHEDULER_FILE, map_location="cpu", weights_only=True),
            rng=torch.load(path / RNG_FILE, map_location="cpu", weights_only=True),
            state=state,
        )
    except Exception as exc:  # any failure to parse means this checkpoint is unusable
        raise CheckpointCorruptError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def load_checkpoint_weights(path: Path, model: torch.nn.Module, device: torch.device | str = "cpu") -> None:
    """Copy only the weights of the checkpoint at `path` into `model` (verified against its manifest first)."""
    path = Path(path)
    _verify(path)
    load_model_tensors(model, load_file(str(path / MODEL_FILE), device=str(device)))


def newest_checkpoint(root: Path, device: torch.device | str = "cpu") -> Checkpoint | None:
    """The newest checkpoint under `root` that verifies and loads; broken newer ones are skipped with a warning."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            return read_checkpoint(path, device)
        except CheckpointCorruptError as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
    return None


# load_state(model, optimizer, tensors, optimizer_state): sets a checkpoint's weights and optimizer state some other
# way than load_state_dict (FSDP: into the shards, see dpo_core.fsdp.load_full_state)
StateLoader = Callable[[torch.nn.Module, torch.optim.Optimizer, dict[str, torch.Tensor], dict[str, Any]], None]


def apply_checkpoint(
    ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    load_state: StateLoader | None = None,
) -> None:
    """Load weights, optimizer, scheduler and RNG states from `ckpt` (a CheckpointCorruptError if they do not fit)."""
    if load_state is None:
        load_model_tensors(model, ckpt.model)
    else:
        check_model_tensors(model, ckpt.model)
    try:
        if load_state is None:
            optimizer.load_state_dict(ckpt.optimizer)
        else:
            load_state(model, optimizer, ckpt.model, ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointCorruptError(f"checkpoint {ckpt.path} does not fit this optimizer: {exc}") from exc
    restore_rng(ckpt.rng)


def resume_latest(
    root: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, device: torch.device | str,
    load_state: StateLoader | None = None,
) -> Checkpoint | None:
    """Apply the newest checkpoint under `root` that verifies, loads and fits; skip broken ones with a warning."""
    for _, path in reversed(list_checkpoints(root)):
        try:
            ckpt = read_checkpoint(path, device)
            apply_checkpoint(ckpt, model, optimizer, scheduler, load_state)
            return ckpt
        except CheckpointCorruptError as exc:
            log.warning("skipping checkpoint %s: %s", path, exc)
    return None
