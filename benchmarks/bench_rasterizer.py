"""Mesh rasterizer benchmark: a 10k-face mesh at 128x128, batch 4, forward + backward.

One step = project -> rasterize -> interpolate colours -> antialias (colour + coverage) -> MSE
against a target -> backward to vertex positions and colours. Prints the machine, then the median
and best time of repeated steps per backend (and the phases of the forward pass).

    python benchmarks/bench_rasterizer.py                 # CPU, torch backend
    python benchmarks/bench_rasterizer.py --device cuda   # torch vs nvdiffrast on the GPU
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_description  # noqa: E402

from distill3d.engine.backends import backends_for, choose
from distill3d.engine.cameras import orbit_cameras
from distill3d.representations.mesh.rasterizer import antialias, interpolate, project, rasterize


def torus(rings: int = 50, segments: int = 100, major: float = 0.6, minor: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """A torus with rings * segments * 2 faces (10,000 by default), tilted so it self-occludes."""
    i = torch.arange(rings, dtype=torch.float32)[:, None]
    j = torch.arange(segments, dtype=torch.float32)[None, :]
    u = 2 * math.pi * j / segments
    v = 2 * math.pi * i / rings
    r = major + minor * torch.cos(v)
    x, z = r * torch.cos(u), r * torch.sin(u)
    y = (minor * torch.sin(v)).expand_as(x)
    verts = torch.stack([x, y, z], -1).reshape(-1, 3)
    tilt = math.radians(30)
    rot = torch.tensor([[1, 0, 0], [0, math.cos(tilt), -math.sin(tilt)], [0, math.sin(tilt), math.cos(tilt)]])
    verts = verts @ rot.T
    a = (torch.arange(rings)[:, None] * segments + torch.arange(segments)[None, :]).reshape(-1)
    ii, jj = a // segments, a % segments
    b = ii * segments + (jj + 1) % segments
    c = ((ii + 1) % rings) * segments + jj
    d = ((ii + 1) % rings) * segments + (jj + 1) % segments
    faces = torch.cat([torch.stack([a, b, d], -1), torch.stack([a, d, c], -1)])
    return verts, faces


def bench(backend: str, device: torch.device, repeats: int, height: int, width: int, batch: int) -> dict:
    verts0, faces = torus()
    verts0, faces = verts0.to(device), faces.to(device)
    colors0 = torch.rand(verts0.shape[0], 3, generator=torch.Generator().manual_seed(0)).to(device)
    cams = orbit_cameras(batch, elevation=20.0, distance=2.2, fovy=45.0).to(device)
    mvp = cams.mvp(aspect=width / height)
    target = torch.full((batch, height, width, 4), 0.5, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        verts = verts0.clone().requires_grad_(True)
        colors = colors0.clone().requires_grad_(True)
        sync()
        c0 = time.process_time()
        t0 = time.perf_counter()
        clip = project(verts, mvp)
        frags = rasterize(clip, faces, height, width, backend=backend)
        sync()
        t1 = time.perf_counter()
        col = interpolate(colors, frags, faces)
        img = torch.cat([col, frags.mask[..., None].to(col.dtype)], -1)
        sync()
        t2 = time.perf_counter()
        img = antialias(img, frags, clip, faces)
        sync()
        t3 = time.perf_counter()
        loss = (img - target).square().mean()
        loss.backward()
        sync()
        t4 = time.perf_counter()
        cpu = time.process_time() - c0
        assert verts.grad is not None and torch.isfinite(verts.grad).all()
        return t4 - t0, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), float(frags.mask.float().mean()), cpu

    for _ in range(3):
        step()
    totals, phases, cpus = [], [], []
    for _ in range(repeats):
        total, ph, cover, cpu = step()
        totals.append(total)
        phases.append(ph)
        cpus.append(cpu)
    med = statistics.median(totals)
    phase_med = [statistics.median(p[k] for p in phases) for k in range(4)]
    return {"median_ms": 1e3 * med, "best_ms": 1e3 * min(totals), "cpu_median_ms": 1e3 * statistics.median(cpus), "phases_ms": [1e3 * p for p in phase_med], "coverage": cover, "faces": faces.shape[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda compares every backend that can run there)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"machine: {machine_description(args.device)}")
    names = [n for n in backends_for("rasterize") if n == "torch" or device.type == "cuda"]
    print(f"auto backend on {device}: {choose('rasterize', 'auto', device)}")
    for name in names:
        try:
            choose("rasterize", name, device)
        except Exception as exc:
            print(f"{name:>10}: unavailable ({exc})")
            continue
        r = bench(name, device, args.repeats, args.size, args.size, args.batch)
        ph = ", ".join(f"{k} {v:.1f}" for k, v in zip(("rasterize", "interpolate", "antialias", "loss+backward"), r["phases_ms"]))
        print(
            f"{name:>10}: {r['faces']} faces, {args.size}x{args.size}, batch {args.batch}, forward+backward "
            f"median {r['median_ms']:.1f} ms, best {r['best_ms']:.1f} ms over {args.repeats}, process CPU time median {r['cpu_median_ms']:.1f} ms "
            f"(coverage {100 * r['coverage']:.0f}%; median phases ms: {ph})"
        )


if __name__ == "__main__":
    main()
