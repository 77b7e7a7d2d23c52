"""Measured sweep of the DMTet refine stage (grid resolution, regulariser weights, seeding, export
smoothing) from one finished NeRF run, each result scored on its exported GLB.

    python benchmarks/bench_mesh_dmtet_sweep.py NERF_RUN_DIR [--out DIR] [--configs NAME,...] [--steps N]
    python benchmarks/bench_mesh_dmtet_sweep.py --proxy-seed default [...]

NERF_RUN_DIR is a finished oracle NeRF run (e.g. `distill3d demo --out runs/c2f --stages nerf`).
--proxy-seed SCENE replaces it by a stand-in for a trained NeRF of a shipped scene, for machines
where a NeRF run takes too long: a density that steps from 0 to many times the NeRF's surface
threshold across the scene's exact surface displaced by smooth noise (plane waves of 0.05 to 0.15
wavelength, about 0.003 amplitude, calibrated so its marching-cubes export has a NeRF-like normal
error), and the exact albedo of the nearest primitive.
First the seed's own export (marching cubes 128) is scored with and without Taubin smoothing; then
each configuration below runs the oracle-dmtet recipe seeded from it and its mesh.glb is reloaded
and scored (benchmarks/eval_mesh.py: PSNR, mask IoU, Chamfer-L1 over the diagonal, normal error).
Prints one JSON line per result and a table; writes OUT/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from eval_mesh import evaluate_mesh  # noqa: E402
from machine import machine_description  # noqa: E402

# name -> recipe overrides (on top of the shipped oracle-dmtet recipe)
CONFIGS: dict[str, list[str]] = {
    "recipe": [],  # the shipped oracle-dmtet recipe as it is
    "old-seed-64": ["representation.seed_sdf=density", "representation.grid_resolution=64", "representation.normal_consistency_weight=0", "representation.laplacian_weight=0"],
    "seed-only-64": ["representation.grid_resolution=64", "trainer.steps=1", "representation.lr_sdf=0", "representation.lr_deformation=0"],
    "g64-nc0": ["representation.grid_resolution=64", "representation.normal_consistency_weight=0", "representation.laplacian_weight=0"],
    "g64-nc1e3": ["representation.grid_resolution=64", "representation.normal_consistency_weight=1000", "representation.laplacian_weight=0"],
    "g64-nc1e4": ["representation.grid_resolution=64", "representation.normal_consistency_weight=10000", "representation.laplacian_weight=0"],
    "g64-nc1e3-lap1e5": ["representation.grid_resolution=64", "representation.normal_consistency_weight=1000", "representation.laplacian_weight=100000"],
    "g96-nc1e3": ["representation.grid_resolution=96", "representation.normal_consistency_weight=1000", "representation.laplacian_weight=0"],
    "g128-nc1e3": ["representation.grid_resolution=128", "representation.normal_consistency_weight=1000", "representation.laplacian_weight=0"],
    # lower geometry learning rates: SDS at 64 px moves the surface by noise, normal consistency smooths it
    "g64-nc1e3-lr1e3": ["representation.grid_resolution=64", "representation.normal_consistency_weight=1000", "representation.lr_sdf=0.001", "representation.lr_deformation=0.001"],
    "g96-nc1e3-lr1e3": ["representation.grid_resolution=96", "representation.normal_consistency_weight=1000", "representation.lr_sdf=0.001", "representation.lr_deformation=0.001"],
    "g96-nc1e3-lr1e3-r128": ["representation.grid_resolution=96", "representation.normal_consistency_weight=1000", "representation.lr_sdf=0.001", "representation.lr_deformation=0.001", "trainer.resolution=128"],
    "g128-nc1e3-lr1e3-s150": ["representation.grid_resolution=128", "representation.normal_consistency_weight=1000", "representation.lr_sdf=0.001", "representation.lr_deformation=0.001", "trainer.steps=150"],
}


def export_and_score(run_dir: Path, smoothing: int, name: str, target_faces: int | None = None) -> dict:
    """Export a finished run's mesh with the given smoothing (and optional decimation) to
    RUN/<name>.glb and score it."""
    from distill3d.engine.trainer import load_run
    from distill3d.representations.mesh.mesh_io import save_mesh

    recipe, representation = load_run(run_dir, purpose="export")
    kwargs = {"smoothing": smoothing}
    if hasattr(representation, "occupancy"):  # the NeRF exports through mesh_from_fields
        from distill3d.representations.mesh.texture_bake import mesh_from_fields

        r = representation.config.radius
        mesh, _ = mesh_from_fields(
            representation.density, lambda p: representation.field(p)[1], bounds=((-r, -r, -r), (r, r, r)),
            resolution=recipe.trainer.export_resolution, threshold=representation.surface_threshold,
            texture_size=recipe.trainer.export_texture_size, target_faces=target_faces, **kwargs,
        )
    else:
        mesh, _ = representation.export_mesh(recipe.trainer.export_resolution, target_faces, recipe.trainer.export_texture_size, **kwargs)
    path = run_dir / f"{name}.glb"
    save_mesh(mesh, path)
    return evaluate_mesh(run_dir, path)


class ProxySeed:
    """A stand-in for a trained NeRF of an analytic scene (see the module docstring)."""

    surface_threshold = math.log(2.0) * 32  # the demo NeRF's: ln 2 / step size (2 / 64)

    def __init__(self, scene_name: str, amplitude: float = 0.003, waves: int = 8, seed: int = 0):
        import torch

        from distill3d.engine.reference_scene import load_scene, resolve_scene_path

        self.path = resolve_scene_path(scene_name)
        self.scene = load_scene(self.path)
        g = torch.Generator().manual_seed(seed)
        self.k = torch.nn.functional.normalize(torch.randn(waves, 3, generator=g), dim=-1) * (2 * math.pi / (0.05 + 0.1 * torch.rand(waves, 1, generator=g)))
        self.phase = torch.rand(waves, generator=g) * 2 * math.pi
        self.amplitude = amplitude / math.sqrt(waves / 2)

    def _displaced_sdf(self, points):
        import torch

        from distill3d.engine.surface_metrics import scene_sdf

        noise = (torch.sin(points.float() @ self.k.T + self.phase) * self.amplitude).sum(-1)
        return scene_sdf(self.scene, points).float() + noise

    def density(self, points):
        import torch

        # the threshold exactly on the displaced surface; ~0 outside 0.006 away, ~120 inside 0.025 deep
        return torch.nn.functional.softplus(self.surface_threshold - self._displaced_sdf(points) * 4000.0)

    def field(self, points):
        import torch

        from distill3d.engine.surface_metrics import _primitive_sdf

        d = torch.stack([_primitive_sdf(p, (points.double() - points.new_tensor(p.center).double()) @ p.matrix()) for p in self.scene.primitives], -1)
        return self.density(points), self.scene.colors[d.argmin(-1)]

    def albedo(self, points):
        return self.field(points)[1]

    def export(self, smoothing: int, target_faces: int | None = None):
        from distill3d.representations.mesh.texture_bake import mesh_from_fields

        return mesh_from_fields(self.density, lambda p: self.field(p)[1], resolution=128, threshold=self.surface_threshold, texture_size=1024, smoothing=smoothing, target_faces=target_faces)[0]


def run_dmtet(seed_run, out: Path, overrides: list[str], steps: int | None) -> float:
    from distill3d.engine.recipe import load_recipe_data, resolve_recipe
    from distill3d.engine.trainer import Trainer

    data = load_recipe_data("oracle-dmtet", overrides + ([f"trainer.steps={steps}"] if steps is not None and not any(o.startswith("trainer.steps") for o in overrides) else []))
    if isinstance(seed_run, ProxySeed):
        data["scene"] = str(seed_run.path)
    else:
        data["scene"] = __import__("yaml").safe_load((seed_run / "config.yaml").read_text())["scene"]
        data["init_from"] = str(seed_run)
    data["trainer"]["export"] = []  # exported below, with and without smoothing
    data["trainer"].update(video_frames=2, video_resolution=32)  # the turntable is not what is measured
    start = time.perf_counter()
    trainer = Trainer.create(resolve_recipe(data), out, quiet=True)
    if isinstance(seed_run, ProxySeed):
        trainer.representation.initialize_from(seed_run)
    trainer.fit()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("seed_run", type=Path, nargs="?")
    parser.add_argument("--proxy-seed", default=None, help="a shipped scene name: use a NeRF stand-in of it instead of a NeRF run")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=None, help="DMTet steps (default: the recipe's)")
    parser.add_argument("--smoothing", default="0,10", help="export smoothing iterations to score, comma-separated")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--decimate", default="", help="also score exports decimated to these face counts (with the last --smoothing), comma-separated")
    args = parser.parse_args()
    print(f"machine: {machine_description()}", flush=True)
    out = args.out or Path(tempfile.mkdtemp(prefix="distill3d-dmtet-sweep-"))
    out.mkdir(parents=True, exist_ok=True)
    smoothings = [int(s) for s in args.smoothing.split(",")]
    results = []

    def record(name: str, smoothing: int, result: dict, seconds: float | None = None) -> None:
        row = {"config": name, "smoothing": smoothing, "seconds": seconds, **{k: v for k, v in result.items() if k != "mesh"}}
        results.append(row)
        print(json.dumps(row), flush=True)
        (out / "sweep.json").write_text(json.dumps(results, indent=2))

    seed = ProxySeed(args.proxy_seed) if args.proxy_seed else args.seed_run
    if seed is None:
        parser.error("give a NeRF run directory or --proxy-seed SCENE")
    if not args.skip_seed:
        for s in smoothings:
            if isinstance(seed, ProxySeed):
                from distill3d.engine.cameras import CameraSampler
                from distill3d.engine.evaluation import evaluate_mesh as evaluate_mesh_object
                from distill3d.engine.recipe import load_recipe_data, resolve_recipe

                recipe = resolve_recipe(load_recipe_data("oracle-dmtet"))
                result = evaluate_mesh_object(seed.export(s), seed.scene, CameraSampler(recipe.cameras), recipe.trainer.eval_views, recipe.trainer.eval_resolution)
                record("proxy-seed-mc128", s, result)
            else:
                record("nerf-seed-mc128", s, export_and_score(seed, s, f"mesh_smooth{s}"))
    for name in args.configs.split(","):
        run = out / name
        seconds = run_dmtet(seed, run, CONFIGS[name], args.steps)
        for s in smoothings:
            record(name, s, export_and_score(run, s, f"mesh_smooth{s}"), round(seconds, 1))
        for faces in filter(None, args.decimate.split(",")):
            record(f"{name}-decimated{faces}", smoothings[-1], export_and_score(run, smoothings[-1], f"mesh_dec{faces}", int(faces)), round(seconds, 1))
    print(f"{'config':<22}{'smooth':>7}{'psnr':>8}{'iou':>7}{'chamfer/diag':>14}{'n_med':>8}{'n_mean':>8}{'faces':>8}{'s':>7}")
    for r in results:
        print(
            f"{r['config']:<22}{r['smoothing']:>7}{r['psnr']:>8.2f}{r['mask_iou']:>7.3f}{r['chamfer_l1_over_diagonal']:>14.5f}"
            f"{r['normal_error_median_deg']:>8.2f}{r['normal_error_mean_deg']:>8.2f}{r['faces']:>8}{(r['seconds'] or 0):>7.0f}"
        )
    print(f"results in {out / 'sweep.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
