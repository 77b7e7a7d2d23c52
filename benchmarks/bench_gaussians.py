"""CPU Gaussian rasterizer benchmark: 10k Gaussians, one view, forward + backward.

The scene: N Gaussians uniform in a ball of radius 0.5 (DreamGaussian's initial volume) with
scales from the mean distance to their 3 nearest neighbours (DreamGaussian's initial scales),
random rotations, opacities uniform in [0.05, 0.95] and random colours, seen from the demo's
evaluation camera (distance 3.2, fovy 42.5). One step = project -> tile -> composite (colour,
depth, opacity) -> loss against a target -> backward to every parameter.

    python benchmarks/bench_gaussians.py                     # 10k at 64x64 and 128x128
    python benchmarks/bench_gaussians.py --count 50000 --sizes 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_description  # noqa: E402

from distill3d.engine.cameras import orbit_cameras
from distill3d.representations.gaussians.model import knn_scales
from distill3d.representations.gaussians.rasterize import RasterSettings, rasterize_gaussians_torch


def ball_scene(n: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    d = torch.nn.functional.normalize(torch.randn(n, 3, generator=g), dim=-1)
    means = d * 0.5 * torch.rand(n, 1, generator=g).pow(1 / 3)
    scales = knn_scales(means.to(device)).cpu()[:, None].repeat(1, 3)
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    colors = torch.rand(n, 3, generator=g)
    return [t.to(device) for t in (means, quats, scales, opacities, colors)]


def bench(n: int, size: int, repeats: int, rasterize=rasterize_gaussians_torch, device: str = "cpu") -> dict:
    means, quats, log_scales, opacities, colors = ball_scene(n, device=device)
    log_scales = log_scales.log()
    params = [t.clone().requires_grad_() for t in (means, quats, log_scales, opacities, colors)]
    cam = orbit_cameras(1, elevation=15.0, distance=3.2, fovy=42.5).to(device)
    w2c = torch.linalg.inv(cam.c2w[0])
    settings = RasterSettings(size, size, float(cam.focal(size)[0]))
    target = torch.full((size, size, 3), 0.5, device=device)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times, fwd_times, pairs = [], [], 0
    for i in range(repeats + 2):
        m, q, ls, o, c = params
        depth = (m - cam.position[0]).norm(dim=-1, keepdim=True)
        sync()
        t0 = time.perf_counter()
        img, alpha, info = rasterize(m, q, ls.exp(), o, torch.cat([c, depth], -1), w2c, settings)
        sync()
        t1 = time.perf_counter()
        loss = ((img[..., :3] + (1 - alpha) - target) ** 2).mean() + img[..., 3].mean() * 1e-3
        loss.backward()
        sync()
        t2 = time.perf_counter()
        for p in params:
            p.grad = None
        if i >= 2:  # warm-up
            times.append(t2 - t0)
            fwd_times.append(t1 - t0)
        pairs = info.get("pairs", 0)
    return {
        "count": n,
        "size": size,
        "median_ms": 1000 * statistics.median(times),
        "best_ms": 1000 * min(times),
        "forward_median_ms": 1000 * statistics.median(fwd_times),
        "tile_pairs": pairs,
        "coverage": float(alpha.detach().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(machine_description("cpu"))
    for size in args.sizes:
        r = bench(args.count, size, args.repeats)
        print(
            f"gaussians {r['count']} at {size}x{size}, forward+backward: median {r['median_ms']:.1f} ms "
            f"(best {r['best_ms']:.1f}, forward {r['forward_median_ms']:.1f}); {r['tile_pairs']} tile-Gaussian pairs, "
            f"mean opacity {r['coverage']:.2f}"
        )


if __name__ == "__main__":
    main()
