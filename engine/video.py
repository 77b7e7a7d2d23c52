"""Turntable videos (MP4 and GIF), written atomically."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from distill3d.engine.cameras import CameraSampler
from distill3d.engine.checkpoint import atomic_path
from distill3d.engine.interfaces import RenderSettings


@torch.no_grad()
def render_turntable(representation, sampler: CameraSampler, frames: int, resolution: int) -> list[np.ndarray]:
    device = next(representation.parameters()).device
    cameras = sampler.eval_cameras(frames).to(device)
    settings = RenderSettings(resolution, resolution, shading="albedo", background="solid", training=False)
    images = []
    for i in range(frames):
        rgb = representation.render(cameras[i], settings).rgb[0].clamp(0, 1)
        images.append((rgb.cpu().numpy() * 255).round().astype(np.uint8))
    return images


def write_video(images: list[np.ndarray], path: Path, fps: int) -> None:
    path = Path(path)
    with atomic_path(path) as tmp:
        if path.suffix == ".gif":
            iio.imwrite(tmp, np.stack(images), extension=".gif", duration=1000 / fps, loop=0)
        elif path.suffix == ".mp4":
            iio.imwrite(tmp, np.stack(images), extension=".mp4", fps=fps, codec="libx264", macro_block_size=1)
        else:
            raise ValueError(f"unknown video format {path.suffix!r}; use .mp4 or .gif")


def write_turntable(representation, sampler: CameraSampler, run_dir: Path, frames: int, resolution: int, fps: int, formats=("mp4", "gif")) -> list[Path]:
    images = render_turntable(representation, sampler, frames, resolution)
    paths = []
    for fmt in formats:
        path = Path(run_dir) / f"turntable.{fmt}"
        write_video(images, path, fps)
        paths.append(path)
    return paths
