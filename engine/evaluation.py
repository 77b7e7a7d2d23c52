"""Scores a representation against the exact renders of its reference from fixed views."""

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
