"""The machine's float32 matrix-multiply peak, measured with torch at the benchmark's thread count.

`python -m bench.matmul_peak --threads 2 --json out.json` times `a @ b` for a few square sizes (and one shape of
the model's own MLP) and reports the best GFLOP/s (2 n^3 FLOP per n x n x n product). Achieved model FLOP/s of
each variant is reported as a fraction of this number.

`--device cuda --dtype bfloat16` measures a GPU's bf16 GEMM peak instead (larger shapes, `CUDA_SHAPES`; the clock is
read after `torch.cuda.synchronize`); `bench.gpu` calls `measure` that way for its MFU. The defaults measure CPU
float32.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import set_threads

# (m, k, n): square GEMMs, plus SmolLM2-135M's MLP up-projection for 4 x 2 x 192 tokens (hidden 576 -> 1536)
SHAPES: tuple[tuple[int, int, int], ...] = ((1024, 1024, 1024), (2048, 2048, 2048), (1536, 576, 1536))
# GPU: square GEMMs big enough to reach the tensor-core peak, plus a Qwen2.5-0.5B MLP up-projection for 8 pairs of
# ~1024 tokens (16384 tokens, hidden 896 -> 4864)
CUDA_SHAPES: tuple[tuple[int, int, int], ...] = ((4096, 4096, 4096), (8192, 8192, 8192), (16384, 896, 4864))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued kernels (CUDA launches are asynchronous); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_gflops(
    m: int, k: int, n: int, *, min_seconds: float = 0.5, repeats: int = 3,
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
) -> float:
    """Best-of-`repeats` GFLOP/s of an (m x k) @ (k x n) product in `dtype` on `device`, each repeat running
    >= `min_seconds` (on CUDA each iteration is synchronised before the clock is read)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    _synchronize(device)
    best = 0.0
    for _ in range(repeats):
        iters, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            iters += 1
            _synchronize(device)
            dt = time.perf_counter() - t0
            if dt >= min_seconds:
                break
        best = max(best, 2.0 * m * k * n * iters / dt / 1e9)
    return best


def measure(
    threads: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    shapes: tuple[tuple[int, int, int], ...] | None = None, min_seconds: float = 0.5, repeats: int = 3,
) -> dict:
    """The best GFLOP/s over `shapes` (default: `SHAPES` on CPU, `CUDA_SHAPES` on CUDA).

    The CPU float32 record is `{threads, per_shape_gflops, peak_gflops}`, as `bench.run` reads it; any other
    device or dtype adds `device` and `dtype`.
    """
    set_threads(threads)
    device = torch.device(device)
    if shapes is None:
        shapes = CUDA_SHAPES if device.type == "cuda" else SHAPES
    per_shape = {
        f"{m}x{k}x{n}": gemm_gflops(m, k, n, min_seconds=min_seconds, repeats=repeats, device=device, dtype=dtype)
        for m, k, n in shapes
    }
    result: dict = {"threads": threads, "per_shape_gflops": per_shape, "peak_gflops": max(per_shape.values())}
    if device.type != "cpu" or dtype != torch.float32:
        result.update(device=str(device), dtype=str(dtype).removeprefix("torch."))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    result = measure(args.threads, device=args.device, dtype=DTYPES[args.dtype])
    blob = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(blob)
    else:
        print(blob)


if __name__ == "__main__":
    main()
