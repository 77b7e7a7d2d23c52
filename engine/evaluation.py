"""Scores a representation, or a mesh it exported, against its exact reference.

Representations: PSNR and mask IoU of their renders over fixed evaluation views. Meshes (the
exported file as a viewer sees it): the same from rasterized renders, plus Chamfer-L1 and the
normal angular error against the exact surface (engine/surface_metrics.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from distill3d.engine.cameras import CameraSampler
from distill3d.engine.interfaces import RenderSettings
from distill3d.engine.references import load_reference


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float() - b.float()) ** 2).clamp_min(1e-12)
    return float(-10 * torch.log10(mse))


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    inter = (a & b).sum().item()
    union = (a | b).sum().item()
    return 1.0 if union == 0 else inter / union


@torch.no_grad()
def evaluate_against_reference(representation, reference_path: Path, sampler: CameraSampler, n_views: int, resolution: int) -> dict:
    """Mean PSNR (dB, on the solid eval background) and mask IoU (opacity > 0.5) over n_views
    evenly spaced views at the sampler's eval elevation, distance and fovy."""
    reference = load_reference(reference_path)
    device = next(representation.parameters()).device
    cameras = sampler.eval_cameras(n_views).to(device)
    settings = RenderSettings(resolution, resolution, shading="albedo", background="solid", training=False)
    per_view = []
    for i in range(n_views):
        cam = cameras[i]
        out = representation.render(cam, settings)
        ref = reference.render(cam, resolution, resolution, background=out.background)
        per_view.append(
            {
                "azimuth": float(cam.azimuth[0]),
                "psnr": psnr(out.rgb.clamp(0, 1), ref.rgb),
                "mask_iou": mask_iou(out.opacity[..., 0] > 0.5, ref.opacity[..., 0] > 0.5),
            }
        )
    return {
        "psnr": sum(v["psnr"] for v in per_view) / n_views,
        "mask_iou": sum(v["mask_iou"] for v in per_view) / n_views,
        "views": n_views,
        "resolution": resolution,
        "elevation": sampler.config.eval_elevation,
        "reference": str(reference_path),
        "per_view": per_view,
    }


@torch.no_grad()
def evaluate_mesh(mesh, reference, sampler: CameraSampler, n_views: int, resolution: int, normal_samples: int = 20000) -> dict:
    """A Mesh (mesh_io.Mesh, textured or vertex-coloured) against a reference (path or loaded):
    PSNR on white and mask IoU over the sampler's evaluation views, Chamfer-L1 and normal error."""
    from distill3d.engine.surface_metrics import surface_metrics
    from distill3d.representations.mesh.render import render_mesh

    if not hasattr(reference, "render"):
        reference = load_reference(reference)
    cams = sampler.eval_cameras(n_views)
    psnrs, ious = [], []
    for i in range(n_views):
        bg = torch.ones(1, resolution, resolution, 3)
        out = render_mesh(mesh, cams[i], resolution, resolution, background=bg)
        ref = reference.render(cams[i], resolution, resolution, background=bg)
        psnrs.append(psnr(out.rgb.clamp(0, 1), ref.rgb))
        ious.append(mask_iou(out.opacity[..., 0] > 0.5, ref.opacity[..., 0] > 0.5))
    result = {
        "faces": int(mesh.faces.shape[0]),
        "textured": mesh.texture is not None,
        "psnr": sum(psnrs) / n_views,
        "mask_iou": sum(ious) / n_views,
    }
    result.update(surface_metrics(mesh.vertices, mesh.faces, reference, samples=normal_samples))
    return result


def add_mesh_evaluation(run_dir: Path, mesh, reference_path: Path, sampler: CameraSampler, n_views: int, resolution: int) -> dict:
    """Score the exported mesh and store it under "mesh" in RUN/eval.json (created if missing)."""
    import json

    from distill3d.engine.checkpoint import atomic_write_text

    path = Path(run_dir) / "eval.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data["mesh"] = evaluate_mesh(mesh, reference_path, sampler, n_views, resolution)
    atomic_write_text(path, json.dumps(data, indent=2))
    return data
