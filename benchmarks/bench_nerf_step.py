"""NeRF training step time at the demo's settings (oracle SDS, 64x64, one view per step).

    python benchmarks/bench_nerf_step.py [--steps 60] [--warmup 80] [--device cpu|cuda]

Runs the real Trainer.train_step on the oracle-nerf recipe and reports seconds per step after a
warm-up (so the occupancy grid is active, as in the demo), split into render+SDS+backward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import machine_description  # noqa: E402

from distill3d.engine.recipe import load_recipe  # noqa: E402
from distill3d.engine.reference_scene import DEFAULT_SCENE  # noqa: E402
from distill3d.engine.trainer import Trainer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=80)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    recipe = load_recipe("oracle-nerf", [f"scene={DEFAULT_SCENE}", f"trainer.device={args.device}"])
    trainer = Trainer.create(recipe, Path(tempfile.mkdtemp()) / "run", quiet=True)
    for step in range(args.warmup):
        trainer.train_step(step)
    times = []
    for step in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        trainer.train_step(step)
        if args.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    rep = recipe.representation
    print(f"machine: {machine_description(args.device)}")
    print(
        f"settings: oracle-nerf, {recipe.trainer.resolution}x{recipe.trainer.resolution}, batch {recipe.trainer.batch_size}, "
        f"{rep['levels']} levels x {rep['features_per_level']}, table 2^{rep['log2_table_size']}, {rep['samples_per_ray']} samples/ray, "
        f"occupancy {rep['occupancy']['resolution']}^3"
    )
    print(f"train step: median {statistics.median(times) * 1000:.1f} ms, best {min(times) * 1000:.1f} ms over {args.steps} steps")


if __name__ == "__main__":
    main()
