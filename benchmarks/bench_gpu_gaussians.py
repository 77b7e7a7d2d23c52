"""GPU Gaussian rasterizer benchmark: gsplat against the torch renderer on the same scene.

100k Gaussians (the bench_gaussians ball scene) at 512x512, one view, forward + backward; median
and best ms per backend, on CUDA only.

    python benchmarks/bench_gpu_gaussians.py [--count 100000] [--size 512] [--repeats 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gaussians import bench  # noqa: E402
from machine import machine_description  # noqa: E402

from distill3d.engine.backends import choose, resolve_op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu_gaussians needs a CUDA GPU (torch.cuda.is_available() is False); "
              "for the CPU renderer run benchmarks/bench_gaussians.py", file=sys.stderr)
        raise SystemExit(2)
    print(machine_description("cuda"))
    device = torch.device("cuda")
    for name in ("gsplat", "torch"):
        try:
            choose("gaussian_rasterize", name, device)
        except Exception as exc:  # gsplat not installed
            print(f"{name:7s} unavailable: {exc}")
            continue
        r = bench(args.count, args.size, args.repeats, resolve_op("gaussian_rasterize", name, device), device="cuda")
        print(f"{name:7s} {r['count']} Gaussians at {args.size}x{args.size}, forward+backward: median {r['median_ms']:.2f} ms "
              f"(best {r['best_ms']:.2f}, forward {r['forward_median_ms']:.2f})")


if __name__ == "__main__":
    main()
