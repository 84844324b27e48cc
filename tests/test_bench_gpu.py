"""The GPU benchmark's CPU smoke run (``python -m bench.gpu --device cpu --shape tiny``): every variant reports sane
numbers, the batch layouts agree on the same batch, and the synthetic lengths look like the shipped pairs'.

The CUDA path itself needs a GPU (see bench/gpu.py); this only checks that the script's plumbing works.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from bench import gpu


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench-gpu") / "gpu.json"
    gpu.main(["--device", "cpu", "--shape", "tiny", "--json", str(out)])
    return json.loads(out.read_text())


def test_every_variant_has_sane_positive_numbers(report):
    variants = report["variants"]
    assert set(variants) == {f"ours_precompute_{layout}" for layout in ("padded", "packed", "shared_prompt")} | {
        "seed_loop"
    }
    s = report["settings"]
    for name, v in variants.items():
        for key in ("pairs_per_second", "tokens_per_second", "flops_per_second", "mfu_measured_peak"):
            assert math.isfinite(v[key]) and v[key] > 0, (name, key, v[key])
        assert v["peak_gpu_mb"] is None and v["mfu_spec_peak"] is None  # a CPU run
        assert all(t > 0 for t in v["step_seconds"]) and all(n > 0 for n in v["step_tokens"])
        assert all(math.isfinite(h["loss"]) for h in v["history"])
    for layout in s["layouts"]:
        v = variants[f"ours_precompute_{layout}"]
        assert len(v["step_seconds"]) == s["steps"] and sum(v["step_pairs"]) == s["steps"] * s["batch_size"]
        assert v["precompute_seconds"] > 0 and 0 < v["pairs_per_second_with_reference"] < v["pairs_per_second"]
        assert v["attn"] == "sdpa" and v["layout"] == layout
    # the seed loop trained exactly the pairs of the trainer's timed steps, one per step, with a live reference
    seed = variants["seed_loop"]
    assert seed["live_reference"] and set(seed["step_pairs"]) == {1}
    assert seed["timed_pair_ids"] == variants["ours_precompute_padded"]["timed_pair_ids"]
    assert sum(seed["step_tokens"]) == sum(variants["ours_precompute_padded"]["step_tokens"])
    assert report["model"]["params"] > 0 and report["peak"]["measured_flops"] > 0
    assert report["targets"]["applicable"] is False and report["targets"]["speedup"]["value"] > 0


def test_layouts_give_the_same_logps_and_loss_on_the_same_batches(report):
    agreement = report["layout_agreement"]
    assert agreement["layouts"] == ["padded", "packed", "shared_prompt"]
    for key, entry in agreement.items():
        if key == "layouts":
            continue
        scale = max(1.0, max(abs(x) for x in entry["values"]))
        assert entry["max_abs_diff"] <= 1e-4 * scale, (key, entry)


def test_synthetic_lengths_follow_the_shipped_pairs():
    lengths = gpu.synthetic_lengths(4000, 1024, 512, seed=0)
    assert lengths.min() >= 1 and lengths[:, 0].max() <= 512
    assert (lengths[:, 0] + lengths[:, 1:].max(axis=1)).max() <= 1024
    mean_pair = float((2 * lengths[:, 0] + lengths[:, 1] + lengths[:, 2]).mean())
    assert 800 < mean_pair < 990  # the shipped pairs average 895 tokens
    again = gpu.synthetic_lengths(4000, 1024, 512, seed=0)
    assert np.array_equal(lengths, again)


def test_matmul_peak_keeps_its_cpu_record():
    import torch

    from bench.matmul_peak import measure

    cpu = measure(torch.get_num_threads(), shapes=((64, 64, 64),), min_seconds=0.01, repeats=1)
    assert set(cpu) == {"threads", "per_shape_gflops", "peak_gflops"} and cpu["peak_gflops"] > 0


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", ("H100 SXM", 989.0)),
        ("NVIDIA H100 PCIe", ("H100 PCIe", 756.0)),
        ("NVIDIA H200", ("H200 SXM", 989.0)),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA A100-SXM4-80GB", None),
    ],
)
def test_datasheet_peak_by_device_name(name, expected):
    assert gpu.datasheet_peak(name) == expected


def test_targets_and_table_of_a_gpu_shaped_report(report):
    """The verdicts and the table as a CUDA run would give them (the CPU report dressed up as one)."""
    fake = copy.deepcopy(report)
    fake["machine"]["gpu"] = "NVIDIA H100 80GB HBM3"
    fake["peak"].update(spec_label="H100 SXM", spec_flops=989e12)
    for v in fake["variants"].values():
        v["peak_gpu_mb"] = 1234.0
        v["mfu_spec_peak"] = v["mfu_measured_peak"] / 1000
    fake["variants"]["ours_precompute_packed"]["mfu_spec_peak"] = 0.45
    settings = gpu.GpuBenchSettings(**{**fake["settings"], "shape": "qwen2.5-0.5b",
                                       "layouts": tuple(fake["settings"]["layouts"])})
    t = gpu.targets(fake["variants"], fake["peak"], settings, on_cuda=True)
    assert t["applicable"] and t["mfu"] == {"variant": "ours_precompute_packed", "value": 0.45,
                                            "against": "mfu_spec_peak", "target": 0.4, "met": True}
    speedup = t["speedup"]["value"]
    assert t["speedup"]["met"] == (speedup >= 5.0)
    fake["targets"] = t
    table = gpu.render(fake)
    assert "MFU (H100 SXM spec)" in table and "1234" in table and "45.0%" in table and "target >= 40% MFU" in table
