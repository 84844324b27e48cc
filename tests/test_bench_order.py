"""Which pairs the benchmark times: bench.ours.trainer_step_pairs names the trainer's own batches, and the seed loop
times a spread subset of them (bench.seed_loop.pair_order)."""

from __future__ import annotations

import torch

from bench.seed_loop import pair_order


def test_trainer_step_pairs_are_the_batches_the_trainer_trains(tokenizer, tiny_model, tmp_path):
    import dpo_core.trainer as trainer_mod
    from bench.common import BenchSettings, load_bench_data
    from bench.ours import train_config, trainer_hooks, trainer_step_pairs
    from dpo_core.models import DeviceSpec

    s = BenchSettings(timed_steps=3, batch_size=2, threads=1)  # 6 pairs, 4 steps: the last starts epoch 2
    data = load_bench_data(tokenizer, s, s.n_pairs).tokenized
    spec = DeviceSpec(device=torch.device("cpu"), dtype=torch.float32, autocast_dtype=None,
                      attn_implementation="eager")
    batches: list = []
    with trainer_hooks(batches):
        result = trainer_mod.train(tiny_model, tokenizer, data, train_config(s), out_dir=tmp_path, spec=spec,
                                   progress_bar=False)
    assert result.steps == s.run_steps == len(batches) == 4
    ids = data.pair_id.tolist()
    plan = trainer_step_pairs(data, s)
    assert [b.pair_ids for b in batches] == [[ids[i] for i in step] for step in plan]
    assert sorted(i for step in plan[:3] for i in step) == list(range(6))  # epoch 1: every pair once
    assert not list(tmp_path.rglob("*.safetensors"))  # trainer_hooks: no checkpoint or final-model writes


def test_seed_loop_times_an_even_spread_of_the_timed_pairs():
    steps = [[7, 6], [5, 4], [3, 2], [1, 0], [6, 7]]  # warm-up batch, then four timed batches
    assert pair_order(steps, 0) == [7, 5, 4, 3, 2, 1, 0, 6, 7]
    assert pair_order(steps, 4) == [7, 5, 3, 1, 6]  # every second timed pair, in the trainer's order
    assert pair_order(steps, 3) == [7, 5, 3, 0]
    assert pair_order(steps, 100) == pair_order(steps, 0)
