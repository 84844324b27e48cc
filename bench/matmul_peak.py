"""The machine's float32 matrix-multiply peak, measured with torch at the benchmark's thread count.

`python -m bench.matmul_peak --threads 2 --json out.json` times `a @ b` for a few square sizes (and one shape of
the model's own MLP) and reports the best GFLOP/s (2 n^3 FLOP per n x n x n product). Achieved model FLOP/s of
each variant is reported as a fraction of this number.
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


def gemm_gflops(m: int, k: int, n: int, *, min_seconds: float = 0.5, repeats: int = 3) -> float:
    """Best-of-`repeats` GFLOP/s of an (m x k) @ (k x n) float32 product, each repeat running >= `min_seconds`."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen)
    b = torch.randn(k, n, generator=gen)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)  # warm-up
    best = 0.0
    for _ in range(repeats):
        iters, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            iters += 1
            dt = time.perf_counter() - t0
            if dt >= min_seconds:
                break
        best = max(best, 2.0 * m * k * n * iters / dt / 1e9)
    return best


def measure(threads: int) -> dict:
    set_threads(threads)
    per_shape = {f"{m}x{k}x{n}": gemm_gflops(m, k, n) for m, k, n in SHAPES}
    return {"threads": threads, "per_shape_gflops": per_shape, "peak_gflops": max(per_shape.values())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    result = measure(args.threads)
    blob = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(blob)
    else:
        print(blob)


if __name__ == "__main__":
    main()
