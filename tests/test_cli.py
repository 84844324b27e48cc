"""`python -m flows.dpo` as a new user meets it: a config, data or model-path mistake ends the run before Prefect
starts, with one line on stderr and exit code 2; `--debug` adds the traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cli(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the CLI from an empty folder with its own state folder; relative model paths resolve against that folder."""
    state = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(REPO), "DPO_STATE_DIR": str(state), "HF_HUB_OFFLINE": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    for name in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_RESULTS_LOCAL_STORAGE_PATH", "DPO_DATA_ROOT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "flows.dpo", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc, state


def _assert_user_error(proc: subprocess.CompletedProcess, state: Path, *fragments: str) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0]
    # it stopped before Prefect started (no ephemeral server database) and before any stage wrote an artifact
    assert not (state / "artifacts").exists()
    assert not list(state.rglob("*.db"))
    return lines[0]


def test_a_setting_the_loss_does_not_read_fails_before_anything_starts(tmp_path):
    proc, state = _cli(tmp_path, "--config", str(REPO / "configs/default.yaml"),
                       "--set", "train.loss=ipo", "--set", "train.label_smoothing=0.1")
    _assert_user_error(proc, state, "train.label_smoothing=0.1 has no meaning for loss 'ipo'")


def test_a_missing_model_folder_is_named_plainly(tmp_path):
    proc, state = _cli(tmp_path, "--config", str(REPO / "configs/gpu-qwen2.5-0.5b.yaml"))
    line = _assert_user_error(proc, state, f"model folder {tmp_path.resolve() / 'models/Qwen2.5-0.5B-Instruct'} "
                                           "does not exist")
    assert "looks like" not in line


def test_a_missing_data_file_is_named_with_its_source(tmp_path):
    proc, state = _cli(tmp_path, "--config", str(REPO / "configs/default.yaml"),
                       "--set", "data.train=[{path: data/no_such/train.jsonl}]")
    _assert_user_error(proc, state, "data.train[0]: data file not found:", "data/no_such/train.jsonl")


def test_a_missing_judge_folder_is_named_before_anything_starts(tmp_path):
    proc, state = _cli(tmp_path, "--config", str(REPO / "configs/default.yaml"),
                       "--set", "eval.judge.kind=reward_model", "--set", "eval.judge.path=/no/such/rm")
    _assert_user_error(proc, state, "eval.judge.path /no/such/rm is not a reward model folder (no config.json there)")


def test_debug_shows_the_traceback_above_the_line(tmp_path):
    proc, state = _cli(tmp_path, "--debug", "--config", str(REPO / "configs/default.yaml"),
                       "--set", "train.loss=ipo", "--set", "train.label_smoothing=0.1")
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "ValidationError" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("error: config ")
    assert not (state / "artifacts").exists()


def test_a_missing_config_file_is_one_line(tmp_path):
    proc, state = _cli(tmp_path, "--config", "no/such/config.yaml")
    _assert_user_error(proc, state, "config file not found: no/such/config.yaml")
