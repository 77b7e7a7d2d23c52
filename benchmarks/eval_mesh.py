"""Score an exported mesh file against a run's reference scene.

    python benchmarks/eval_mesh.py RUN_DIR [--mesh RUN_DIR/mesh.glb]

Loads the file back (as a user's tool would), renders it with the rasterizer from the run's 8
evaluation views against exact renders (PSNR on white, mask IoU), and measures Chamfer-L1 between
points on the mesh and exact surface points of the reference (ray hits from 64 views at 96x96),
as a fraction of the reference's bounding-box diagonal. Works for scene and mesh references.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_description  # noqa: E402

from distill3d.engine.cameras import CameraSampler, make_cameras, pixel_rays  # noqa: E402
from distill3d.engine.config import from_dict  # noqa: E402
from distill3d.engine.evaluation import mask_iou, psnr  # noqa: E402
from distill3d.engine.recipe import resolve_recipe  # noqa: E402
from distill3d.engine.references import load_reference  # noqa: E402
from distill3d.representations.mesh.mesh_io import load_mesh, sample_surface  # noqa: E402
from distill3d.representations.mesh.render import render_mesh  # noqa: E402


def nearest(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cdist(chunk, b).min(dim=1).values for chunk in a.split(4096)])


@torch.no_grad()
def evaluate_mesh(run_dir: Path, mesh_path: Path | None = None) -> dict:
    """PSNR / mask IoU of the reloaded mesh file over the run's eval views, and Chamfer-L1 against
    the exact reference surface (also as a fraction of the reference's bounding-box diagonal)."""
    import yaml

    recipe = resolve_recipe(yaml.safe_load((run_dir / "config.yaml").read_text()))
    reference = load_reference(recipe.reference)
    mesh_path = mesh_path or run_dir / "mesh.glb"
    mesh = load_mesh(mesh_path)
    sampler = CameraSampler(recipe.cameras)
    cams = sampler.eval_cameras(recipe.trainer.eval_views)
    res = recipe.trainer.eval_resolution
    psnrs, ious = [], []
    for i in range(len(cams)):
        bg = torch.ones(1, res, res, 3)
        out = render_mesh(mesh, cams[i], res, res, background=bg)
        ref = reference.render(cams[i], res, res, background=bg)
        psnrs.append(psnr(out.rgb.clamp(0, 1), ref.rgb))
        ious.append(mask_iou(out.opacity[..., 0] > 0.5, ref.opacity[..., 0] > 0.5))
    # Exact reference surface points: ray hits from 64 views spread over the sphere.
    g = torch.Generator().manual_seed(0)
    el = torch.rad2deg(torch.asin(torch.rand(64, generator=g) * 2 - 1))
    az = torch.rand(64, generator=g) * 360 - 180
    views = make_cameras(el, az, 3.2, 42.5)
    o, d = pixel_rays(views, 96, 96)
    exact = reference.render(views, 96, 96)  # ray distance in depth: works for scenes and meshes
    hit = exact.opacity.reshape(-1) > 0.5
    ref_pts = (o.reshape(-1, 3) + d.reshape(-1, 3) * exact.depth.reshape(-1, 1))[hit]
    ref_pts = ref_pts[torch.randperm(ref_pts.shape[0], generator=g)[:30000]]
    mesh_pts = sample_surface(mesh.vertices, mesh.faces, 30000, g)
    chamfer = 0.5 * (nearest(mesh_pts, ref_pts).mean() + nearest(ref_pts, mesh_pts).mean())
    diagonal = (ref_pts.max(0).values - ref_pts.min(0).values).norm()
    return {
        "mesh": str(mesh_path),
        "faces": int(mesh.faces.shape[0]),
        "textured": mesh.texture is not None,
        "psnr": sum(psnrs) / len(psnrs),
        "mask_iou": sum(ious) / len(ious),
        "chamfer_l1": float(chamfer),
        "chamfer_l1_over_diagonal": float(chamfer / diagonal),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--mesh", type=Path, default=None)
    args = parser.parse_args()
    result = evaluate_mesh(args.run_dir, args.mesh)
    print(f"machine: {machine_description()}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
