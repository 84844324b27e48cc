"""Data-parallel training on CPU: 2 gloo processes started by torchrun (through tasks.launch) against 1 process,
with DDP (a full model per rank) and with FSDP (``train.strategy: fsdp``, the model sharded by ``fully_shard``).

The training set has 9 pairs and batch_size 4, so every epoch ends with a 1-pair micro-batch: rank 1 gets no pair
there (it joins the all-reduce, or FSDP's all-gathers and reduce-scatters, with a zero-weight pass) and nothing may
be counted twice.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from dpo_core.checkpoints import OPTIMIZER_FILE, checkpoint_dir
from dpo_core.config import LoraConfig, ModelConfig, TrainConfig
from dpo_core.distributed import SINGLE, Dist, DistributedError, all_reduce_sums, resolve_strategy, shard
from dpo_core.models import DeviceSpec, tiny_llama
from dpo_core.models import attach_lora, load_model, pick_device
from dpo_core.reference import compute_reference_logps, read_reference_table
from dpo_core.train_main import PROGRESS_PREFIX, ReferenceJob, TrainJob, main, read_job, read_result
from dpo_core.train_main import run_train_job
from dpo_core.trainer import TrainError, train
from faults.inject import step_failure
from tasks.launch import RankFailedError, launch_reference, launch_training, torchrun_command

CPU = DeviceSpec(torch.device("cpu"), torch.float32, None, "eager")
N_PAIRS, STEPS = 9, 6  # 2 epochs of ceil(9 / 4) = 3 steps
CURVE = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
         "logps/rejected", "grad_norm")


def _pairs(n: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ids = lambda k: rng.integers(20, 2000, size=k).tolist()  # noqa: E731
    return pd.DataFrame([
        {"pair_id": f"p{i}", "split": "train" if i < n else "eval", "prompt_ids": ids(int(rng.integers(3, 12))),
         "chosen_ids": ids(int(rng.integers(2, 14))), "rejected_ids": ids(int(rng.integers(2, 14))),
         "prompt_truncated": False, "chosen_truncated": False, "rejected_truncated": False}
        for i in range(n + 1)  # one eval row: the job must train on the train split only
    ])


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("dist-data")
    tiny_llama(tokenizer, seed=0, hidden_size=32).save_pretrained(root / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "model")
    _pairs(N_PAIRS).to_parquet(root / "tokenized.parquet")
    return root


def _job(data, out, processes: int, strategy: str = "auto", train_kw: dict | None = None, **kw) -> TrainJob:
    settings = dict(learning_rate=5e-3, batch_size=4, grad_accum=1, epochs=2, warmup_ratio=0.2, checkpoint_every=2,
                    keep_checkpoints=2, seed=3, beta=0.5, mega_batch_mult=2, processes=processes, strategy=strategy)
    cfg = TrainConfig(**{**settings, **(train_kw or {})})
    model = ModelConfig(name_or_path=str(data / "model"), device="cpu", attn_implementation="eager")
    return TrainJob(model_dir=str(data / "model"), model=model, tokenized=str(data / "tokenized.parquet"),
                    train=cfg, out_dir=str(out), **kw)


def _history(out) -> list[dict]:
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def _weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    return out, run_train_job(_job(data, out, 1))


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    progress: list[dict] = []
    record = launch_training(_job(data, out, 2), 2, on_progress=progress.append)
    return out, record, progress


def test_two_gloo_processes_give_the_loss_curve_of_one_process(one_process, two_processes):
    (out1, rec1), (out2, rec2, progress) = one_process, two_processes
    assert rec1["world_size"] == 1 and rec2["world_size"] == 2
    assert rec1["status"] == rec2["status"] == "complete" and rec1["steps"] == rec2["steps"] == STEPS
    assert [m["step"] for m in progress] == list(range(1, STEPS + 1))  # rank 0's progress reached the launcher
    _assert_same_curve(out1, out2)
    # the rank left without a pair in each epoch's last 1-pair batch added nothing: same token count, no duplicates
    assert rec1["tokens"] == rec2["tokens"]
    w1, w2 = _weights(out1), _weights(out2)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-5)


def test_reference_split_across_ranks_is_the_single_process_table(one_process, two_processes):
    # no reference table in the job: the trainer scores the initial policy, split across the 2 ranks and gathered
    t1 = pd.read_parquet(one_process[0] / "reference.parquet")
    t2 = pd.read_parquet(two_processes[0] / "reference.parquet")
    assert list(t2["pair_id"]) == [f"p{i}" for i in range(N_PAIRS)] == list(t1["pair_id"])
    assert t2.dtypes.to_dict() == t1.dtypes.to_dict()
    assert (t2[["chosen_tokens", "rejected_tokens"]] == t1[["chosen_tokens", "rejected_tokens"]]).all().all()
    np.testing.assert_allclose(t2[["chosen_logps", "rejected_logps"]], t1[["chosen_logps", "rejected_logps"]],
                               rtol=1e-6)


def test_the_reference_precompute_on_two_ranks_gathers_the_whole_table(data, tmp_path):
    model_cfg = ModelConfig(name_or_path=str(data / "model"), device="cpu", attn_implementation="eager")
    out_file = tmp_path / "reference" / "reference.parquet"
    job = ReferenceJob(model_dir=str(data / "model"), model=model_cfg, tokenized=str(data / "tokenized.parquet"),
                       out_file=str(out_file), batch_size=3, processes=2)
    progress: list[dict] = []
    record = launch_reference(job, on_progress=progress.append)
    assert record == {"status": "complete", "rows": N_PAIRS + 1, "world_size": 2, "out_file": str(out_file)}
    assert progress[-1] == {"done": N_PAIRS + 1, "total": N_PAIRS + 1}
    assert isinstance(read_job(out_file.parent / "reference_job.json"), ReferenceJob)

    tokenized = pd.read_parquet(data / "tokenized.parquet")
    alone = compute_reference_logps(load_model(data / "model", model_cfg, pick_device(model_cfg)), tokenized,
                                    batch_size=3, spec=CPU)
    gathered = read_reference_table(out_file)
    assert list(gathered["pair_id"]) == list(tokenized["pair_id"])  # every split, in the input order
    pd.testing.assert_frame_equal(gathered, alone, rtol=1e-6)


def test_a_dead_rank_is_named_and_the_run_resumes_on_two_or_one_processes(data, tmp_path, two_processes):
    out = tmp_path / "killed"
    job = _job(data, out, 2)
    # rank 1 dies after step 3; the newest checkpoint is step 2; torchrun stops rank 0
    with pytest.raises(RankFailedError) as info:
        launch_training(job, 2, env=step_failure.env(after_step=3, rank=1))
    err = info.value
    assert err.rank == 1 and err.exit_code == 1
    assert "rank 1 of 2" in str(err) and "InjectedFailure" in str(err)
    assert any("injected failure on rank 1 after step 3" in line for line in err.last_lines)
    assert not (out / "final").exists()
    shutil.copytree(out, tmp_path / "then-one")

    record = launch_training(job, 2)  # relaunch on 2 processes
    assert record["status"] == "complete" and record["resumed_from_step"] == 2
    assert [row["step"] for row in _history(out)] == list(range(1, STEPS + 1))
    reference = _weights(two_processes[0])
    for name, tensor in _weights(out).items():
        assert torch.equal(tensor, reference[name]), name  # bit-identical to the uninterrupted 2-process run

    # the same checkpoint on 1 process: the global batch does not depend on the world size
    record = run_train_job(_job(data, tmp_path / "then-one", 1))
    assert record["resumed_from_step"] == 2 and record["world_size"] == 1
    np.testing.assert_allclose([r["loss"] for r in _history(tmp_path / "then-one")],
                               [r["loss"] for r in _history(two_processes[0])], rtol=1e-5)
    for name, tensor in _weights(tmp_path / "then-one").items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- FSDP (fully_shard)


@pytest.fixture(scope="module")
def fsdp_processes(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    progress: list[dict] = []
    record = launch_training(_job(data, out, 2, "fsdp"), 2, on_progress=progress.append)
    return out, record, progress


def _assert_same_curve(out1, out2) -> None:
    """Same loss curve (float tolerance) and schedule in two runs' output folders, and the runs trained.

    atol 1e-5: the rewards are beta * (logp - ref logp), near 0 early on, from log-probs of about -40 whose float32
    spacing is 3.8e-6; several ranks (and FSDP's reduce-scatter) sum in another order than one process.
    """
    h1, h2 = _history(out1), _history(out2)
    assert len(h1) == len(h2) == STEPS
    for a, b in zip(h1, h2):
        np.testing.assert_allclose([b[k] for k in CURVE], [a[k] for k in CURVE], rtol=1e-5, atol=1e-5)
        assert a["learning_rate"] == b["learning_rate"] and a["epoch"] == b["epoch"]
    assert h1[-1]["loss"] < h1[0]["loss"]  # it trained


def _assert_same_training(out1, out2) -> None:
    """`_assert_same_curve` and the same final weights."""
    _assert_same_curve(out1, out2)
    w1, w2 = _weights(out1), _weights(out2)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-5)


def test_fsdp_on_two_gloo_processes_gives_the_loss_curve_and_weights_of_one_process(one_process, fsdp_processes):
    (out1, rec1), (out2, rec2, progress) = one_process, fsdp_processes
    assert rec2["world_size"] == 2 and rec2["strategy"] == "fsdp" and rec1["strategy"] == "single"
    assert rec2["status"] == "complete" and rec2["steps"] == STEPS
    assert [m["step"] for m in progress] == list(range(1, STEPS + 1))
    _assert_same_training(out1, out2)
    assert rec1["tokens"] == rec2["tokens"]  # the zero-weight passes counted nothing
    # the checkpoint holds the consolidated weights and AdamW state in the single-process format (integer ids)
    ckpt1, ckpt2 = checkpoint_dir(out1 / "checkpoints", STEPS), checkpoint_dir(out2 / "checkpoints", STEPS)
    assert load_file(str(ckpt2 / "model.safetensors")).keys() == load_file(str(ckpt1 / "model.safetensors")).keys()
    opt1, opt2 = (torch.load(c / OPTIMIZER_FILE, weights_only=True) for c in (ckpt1, ckpt2))
    assert opt2["param_groups"] == opt1["param_groups"]
    assert opt2["state"].keys() == opt1["state"].keys()
    for i, state in opt1["state"].items():
        assert opt2["state"][i].keys() == state.keys()
        for key, value in state.items():
            assert not hasattr(opt2["state"][i][key], "to_local")  # plain tensors, not DTensor shards
            torch.testing.assert_close(opt2["state"][i][key], value, rtol=1e-4, atol=1e-6)


def test_fsdp_with_gradient_checkpointing_and_accumulation_matches_one_process(data, tmp_path):
    # 9 pairs in micro-batches of 2, 2 per step: each epoch's last step is one 1-pair micro-batch (rank 1 idles)
    settings = dict(batch_size=2, grad_accum=2, gradient_checkpointing=True)
    run_train_job(_job(data, tmp_path / "one", 1, train_kw=settings))
    record = launch_training(_job(data, tmp_path / "fsdp", 2, "fsdp", train_kw=settings), 2)
    assert record["status"] == "complete" and record["strategy"] == "fsdp" and record["steps"] == STEPS
    _assert_same_training(tmp_path / "one", tmp_path / "fsdp")


def test_an_fsdp_run_resumes_after_a_dead_rank_on_two_fsdp_processes_or_one_process(data, tmp_path, fsdp_processes):
    out = tmp_path / "killed"
    job = _job(data, out, 2, "fsdp")
    with pytest.raises(RankFailedError) as info:  # rank 1 dies after step 3; the newest checkpoint is step 2
        launch_training(job, 2, env=step_failure.env(after_step=3, rank=1))
    assert info.value.rank == 1 and "InjectedFailure" in str(info.value)
    assert not (out / "final").exists()
    shutil.copytree(out, tmp_path / "then-one")

    record = launch_training(job, 2)  # the step-2 checkpoint, set into the shards of 2 new ranks
    assert record["status"] == "complete" and record["resumed_from_step"] == 2 and record["strategy"] == "fsdp"
    assert [row["step"] for row in _history(out)] == list(range(1, STEPS + 1))
    reference = _weights(fsdp_processes[0])
    for name, tensor in _weights(out).items():
        assert torch.equal(tensor, reference[name]), name  # bit-identical to the uninterrupted FSDP run

    # the FSDP checkpoint on 1 process (world size 2 -> 1, sharded -> whole)
    record = run_train_job(_job(data, tmp_path / "then-one", 1))
    assert record["resumed_from_step"] == 2 and record["world_size"] == 1 and record["strategy"] == "single"
    np.testing.assert_allclose([r["loss"] for r in _history(tmp_path / "then-one")],
                               [r["loss"] for r in _history(fsdp_processes[0])], rtol=1e-5)
    for name, tensor in _weights(tmp_path / "then-one").items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-5, atol=1e-5)


def test_a_single_process_checkpoint_resumes_on_two_fsdp_processes(data, tmp_path, one_process, monkeypatch):
    from dpo_core import train_main

    out = tmp_path / "one-then-fsdp"
    with monkeypatch.context() as patched:  # 1 process fails after step 2 (checkpointed: checkpoint_every 2)
        patched.setattr(train_main, "train", step_failure.failing(train_main.train, after_step=2))
        with pytest.raises(step_failure.InjectedFailure):
            run_train_job(_job(data, out, 1))
    record = launch_training(_job(data, out, 2, "fsdp"), 2)  # world size 1 -> 2, whole -> sharded
    assert record["resumed_from_step"] == 2 and record["strategy"] == "fsdp" and record["steps"] == STEPS
    _assert_same_training(one_process[0], out)


def test_the_rank_entry_prints_progress_and_writes_the_result(data, tmp_path, capsys):
    job_file = _job(data, tmp_path, 1, train_kw={"max_steps": 2}).write(tmp_path / "job.json")
    assert main([str(job_file)]) == 0  # the per-rank entry torchrun starts, here as the only process
    result = read_result(tmp_path)
    assert {k: result[k] for k in ("world_size", "status", "steps", "strategy", "resumed_from_step")} == {
        "world_size": 1, "status": "complete", "steps": 2, "strategy": "single", "resumed_from_step": None}
    assert [json.loads(line.removeprefix(PROGRESS_PREFIX))["step"] for line in capsys.readouterr().out.splitlines()
            if line.startswith(PROGRESS_PREFIX)] == [1, 2]
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_lora_initial_adapters_do_not_depend_on_earlier_rng_use(data, tmp_path, tokenizer, monkeypatch):
    """run_train_job (the in-process and the per-rank entry) seeds with train.seed before it builds the model."""
    from dpo_core import train_main

    class Built(Exception):
        pass

    def stop_with_adapters(model, *args, **kwargs):  # stands in for dpo_core.trainer.train
        raise Built({k: v.clone() for k, v in model.state_dict().items() if "lora_A" in k})

    monkeypatch.setattr(train_main, "train", stop_with_adapters)
    lora = LoraConfig(r=2)
    adapters = []
    for draws in (0, 1000):
        torch.rand(draws)  # earlier RNG use in this process
        job = _job(data, tmp_path / str(draws), 1)
        with pytest.raises(Built) as built:
            run_train_job(job.model_copy(update={"model": job.model.model_copy(update={"lora": lora})}))
        adapters.append(built.value.args[0])
    assert adapters[0] and adapters[0].keys() == adapters[1].keys()
    for name, tensor in adapters[0].items():
        assert tensor.abs().sum() > 0 and torch.equal(tensor, adapters[1][name]), name

    # the adapters are drawn from the global RNG: without that seed they would differ
    base = tiny_llama(tokenizer, seed=0, hidden_size=32)
    unseeded = []
    for draws in (0, 1000):
        torch.rand(draws)
        model = attach_lora(copy.deepcopy(base), ModelConfig(lora=lora))
        unseeded.append({k: v for k, v in model.state_dict().items() if "lora_A" in k})
    assert any(not torch.equal(tensor, unseeded[1][name]) for name, tensor in unseeded[0].items())


def test_shards_split_unevenly_and_never_duplicate():
    for world in (2, 3):
        for n in (1, 4, 5):
            parts = [shard(list(range(n)), Dist(rank=r, world=world)) for r in range(world)]
            assert sorted(i for part in parts for i in part) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert shard([7, 8, 9], SINGLE) == [7, 8, 9]
    assert all_reduce_sums([1, 2.5], SINGLE) == [1.0, 2.5]


def test_strategy_resolution_and_clear_errors(tmp_path, tokenizer):
    assert resolve_strategy("auto", 1) == "single" and resolve_strategy("auto", 4) == "ddp"
    assert resolve_strategy("ddp", 2) == "ddp" and resolve_strategy("fsdp", 2) == "fsdp"
    with pytest.raises(DistributedError, match="'single' cannot run 2 processes"):
        resolve_strategy("single", 2)
    with pytest.raises(DistributedError, match="'fsdp' does not support LoRA"):
        resolve_strategy("fsdp", 2, lora=True)

    model, df = tiny_llama(tokenizer, seed=0, hidden_size=32), _pairs(4)
    lora_model = attach_lora(tiny_llama(tokenizer, seed=0, hidden_size=32), ModelConfig(lora=LoraConfig(r=2)))
    cases = [(model, dict(processes=2), "train.processes=2 but this run has 1 process"),
             (model, dict(strategy="single", processes=2), "'single' cannot run 2 processes"),
             (model, dict(strategy="fsdp"), r"'fsdp' needs train.processes >= 2 .*use 'single' or 'auto'"),
             (model, dict(strategy="fsdp", processes=2), "train.processes=2 but this run has 1 process"),
             (lora_model, dict(strategy="fsdp", processes=2),
              r"'fsdp' does not support LoRA \(model.lora\); use 'ddp'")]
    for policy, kw, message in cases:
        with pytest.raises(TrainError, match=message):
            train(policy, tokenizer, df, TrainConfig(**kw), out_dir=tmp_path, spec=CPU, progress_bar=False)
    with pytest.raises(ValueError, match="2 or more processes"):
        launch_training(_job(tmp_path, tmp_path, 1), 1)
    with pytest.raises(ValueError, match="job.train.processes=1 but 2"):
        launch_training(_job(tmp_path, tmp_path, 1), 2)
    assert torchrun_command(tmp_path / "job.json", 2)[1:6] == ["-m", "torch.distributed.run", "--standalone",
                                                                "--nproc_per_node=2", "--tee=3"]


def test_the_launcher_builds_a_multi_node_torchrun_command(data, tmp_path, monkeypatch):
    import subprocess
    import sys

    from pydantic import ValidationError
    from torch.distributed.run import get_args_parser

    from tasks import launch

    job_file = tmp_path / "job.json"
    cmd = torchrun_command(job_file, 8, nnodes=2, rdzv_endpoint="10.0.0.1:29400", rdzv_id="run-7")
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=4",
                   "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=run-7", "--tee=3",
                   "-m", "dpo_core.train_main", str(job_file)]
    args = get_args_parser().parse_args(cmd[3:])  # torchrun's own parser accepts it as meant
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id, args.standalone) \
        == ("2", "4", "c10d", "10.0.0.1:29400", "run-7", False)
    assert get_args_parser().parse_args(torchrun_command(job_file, 2)[3:]).standalone  # one node: unchanged
    with pytest.raises(ValueError, match="cannot be split evenly over 2 nodes"):
        torchrun_command(job_file, 3, nnodes=2, rdzv_endpoint="h:1")
    with pytest.raises(ValueError, match="need a rendezvous endpoint"):
        torchrun_command(job_file, 4, nnodes=2)
    with pytest.raises(ValidationError, match=r"train.processes \(3\) must be a multiple of train.nnodes \(2\)"):
        TrainConfig(processes=3, nnodes=2, rdzv_endpoint="h:1")
    with pytest.raises(ValidationError, match="train.nnodes=2 needs train.rdzv_endpoint as host:port"):
        TrainConfig(processes=4, nnodes=2)

    # launch_training takes the nodes from the job's train config (no process is started here)
    class Started(Exception):
        pass

    def popen(cmd, **kw):
        raise Started(cmd)

    monkeypatch.setattr(subprocess, "Popen", popen)
    job = _job(data, tmp_path / "out", 4, "fsdp", train_kw=dict(nnodes=2, rdzv_endpoint="node0:29400", rdzv_id="r1"))
    with pytest.raises(Started) as info:
        launch.launch_training(job, 4)
    assert info.value.args[0][3:8] == ["--nnodes=2", "--nproc_per_node=2", "--rdzv-backend=c10d",
                                       "--rdzv-endpoint=node0:29400", "--rdzv-id=r1"]


def test_progress_lines_are_written_whole_and_a_cut_one_is_not_fatal(data, tmp_path, monkeypatch, caplog):
    import io
    import subprocess
    import sys

    from dpo_core import train_main

    writes: list[str] = []

    class Stdout:
        def write(self, text: str) -> None:
            writes.append(text)

        def flush(self) -> None:
            pass

    # torchrun's --tee forwards what it has read of a rank's log: text and newline must reach the file in one write
    monkeypatch.setattr(sys, "stdout", Stdout())
    train_main._print_progress({"step": 3, "total_steps": 6})
    monkeypatch.undo()
    assert writes == ['DPO_PROGRESS {"step": 3, "total_steps": 6}\n']

    # a line read before its newline was written reaches the launcher as `[default0]:<text>[default0]:`
    job = _job(data, tmp_path / "out", 2)
    record = {"world_size": 2, "status": "complete", "steps": 2}
    output = ('[default0]:DPO_PROGRESS {"step": 1, "total_steps": 2}\n'
              '[default0]:DPO_PROGRESS {"step": 2, "total_steps": 2}[default0]:\n'
              '[default1]:a line of rank 1\n')

    class Torchrun:  # its ranks' output, and the result file rank 0 writes
        pid = -1

        def __init__(self, cmd, **kw) -> None:
            self.stdout = io.StringIO(output)
            (job.result_dir / train_main.RESULT_FILE).write_text(json.dumps(record))

        def wait(self, timeout=None) -> int:
            return 0

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(subprocess, "Popen", Torchrun)
    progress: list[dict] = []
    with caplog.at_level("INFO", logger="tasks.launch"):
        assert launch_training(job, 2, on_progress=progress.append) == record
    assert progress == [{"step": 1, "total_steps": 2}]
    assert "unreadable progress line" in caplog.text and "a line of rank 1" in caplog.text


class _RecordedProgress:
    """Stands in for tasks.common.Progress (whose Prefect artifact would start a temporary server outside a run)."""

    updates: list[tuple[int, int]] = []

    def __init__(self, key: str, description: str) -> None:
        self.key = key

    def update(self, done: int, total: int, force: bool = False) -> None:
        self.updates.append((done, total))


def test_the_train_stage_launches_torchrun_when_processes_is_two(data, tmp_path, one_process, monkeypatch):
    from dpo_core.config import RunConfig
    from tasks import train as train_task
    from tasks.train import train_stage
    from tasks.train_output import policy_dir, read_history

    monkeypatch.setattr(train_task, "Progress", _RecordedProgress)

    job = _job(data, tmp_path, 2)
    cfg = RunConfig(model=job.model, train=job.train.model_copy(update={"max_steps": 2}), state_dir=str(tmp_path))
    model = {"content_hash": "tiny", "model_dir": str(data / "model")}
    tokenized = {"content_hash": "pairs", "path": str(data), "tokenized_file": "tokenized.parquet"}
    reference = {"content_hash": "ref", "path": str(one_process[0]), "reference_file": "reference.parquet"}
    manifest = train_stage.fn(cfg, model, tokenized, reference)  # the task body, outside a flow run
    assert manifest["steps"] == 2 and manifest["resumed_from_step"] is None
    assert _RecordedProgress.updates == [(1, 2), (2, 2), (2, 2)]  # rank 0's steps, then the final forced update
    assert [row["step"] for row in read_history(manifest)] == [1, 2]
    assert (policy_dir(manifest) / "model.safetensors").is_file()
    assert not (tmp_path / "artifacts" / "train" / manifest["key"] / "checkpoints").exists()
    np.testing.assert_allclose(read_history(manifest)[1]["loss"], _history(one_process[0])[1]["loss"], rtol=1e-5)


def test_validation_scoring_and_best_val_on_two_processes_match_one_process(data, tmp_path):
    """Rank 0 scores the validation split and every rank records the same numbers: the history, the chosen step and
    the output weights are those of one process."""
    table = pd.concat([_pairs(N_PAIRS), _pairs(3, seed=1).iloc[:3].assign(
        pair_id=lambda d: "v" + d["pair_id"], split="validation")])
    table.to_parquet(tmp_path / "tokenized.parquet")
    kw = dict(train_kw={"eval_every": 2, "select": "best_val", "select_metric": "val/loss"},
              validation_split="validation")
    one = run_train_job(_job(data, tmp_path / "one", 1, **kw).model_copy(
        update={"tokenized": str(tmp_path / "tokenized.parquet")}))
    two = launch_training(_job(data, tmp_path / "two", 2, **kw).model_copy(
        update={"tokenized": str(tmp_path / "tokenized.parquet")}), 2)
    h1, h2 = _history(tmp_path / "one"), _history(tmp_path / "two")
    scored = [r["step"] for r in h1 if "val/loss" in r]
    assert scored == [r["step"] for r in h2 if "val/loss" in r] == [2, 4, 6]
    for a, b in zip(h1, h2):
        for key in ("val/loss", "val/rewards/accuracies", "val/rewards/margins"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    assert one["selected_step"] == two["selected_step"] in scored
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-5)


def test_kto_on_two_gloo_processes_uses_the_whole_micro_batchs_kl_and_matches_one_process(data, tmp_path):
    """KTO's KL reference point is summed over the ranks (dpo_core.losses.kto_kl's gather): two processes train
    exactly as one, the rank without a row in each epoch's last 1-row batch included."""
    rows = pd.read_parquet(data / "tokenized.parquet").assign(label=[i % 3 != 0 for i in range(N_PAIRS + 1)])
    kto = data / "kto"
    kto.mkdir(exist_ok=True)
    shutil.copytree(data / "model", kto / "model", dirs_exist_ok=True)
    rows.to_parquet(kto / "tokenized.parquet")
    run_train_job(_job(kto, tmp_path / "one", 1, train_kw={"loss": "kto"}))
    launch_training(_job(kto, tmp_path / "two", 2, train_kw={"loss": "kto"}), 2)
    _assert_same_curve(tmp_path / "one", tmp_path / "two")
    one, two = _history(tmp_path / "one"), _history(tmp_path / "two")
    np.testing.assert_allclose([r["kl"] for r in two], [r["kl"] for r in one], rtol=1e-5, atol=1e-6)
    assert any(r["kl"] > 0 for r in one), "the KL estimate stayed 0: the gather was not exercised"
