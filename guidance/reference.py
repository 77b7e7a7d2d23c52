"""Reference-view losses: the render from the reference camera must match a known image.

Used for image-to-3D (the input photo) and with the oracle (an exact render of the reference).
RGB MSE on the image composited over the render's background, and mask MSE or BCE on opacity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from distill3d.engine.cameras import Cameras, make_cameras
from distill3d.engine.errors import UserError
from distill3d.engine.interfaces import BuildContext, Guidance, RenderOutput, RenderSettings
from distill3d.engine.schedules import Schedule, ScheduleSpec

IMAGE_SUFFIXES = (".png", ".webp", ".tif", ".tiff")


@dataclass
class ReferenceViewConfig:
    image: str | None = None  # RGBA image; None: the run's reference (image or scene file)
    elevation: float = 0.0
    azimuth: float = 0.0
    distance: float = 3.2
    fovy: float = 42.5
    resolution: int = 64
    every: int = 1  # apply every N steps
    rgb_weight: ScheduleSpec = 1000.0
    mask_weight: ScheduleSpec = 100.0
    mask_loss: Literal["mse", "bce"] = "mse"


def load_rgba(path: Path, size: int) -> tuple[Tensor, Tensor]:
    """RGB (1, size, size, 3) and alpha (1, size, size, 1) in [0, 1] from an RGBA image file."""
    import imageio.v3 as iio

    try:
        image = iio.imread(path)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot read image {path}: {exc}") from exc
    if image.ndim != 3 or image.shape[2] != 4:
        raise UserError(
            f"{path} has no alpha channel: give an RGBA image with a transparent background "
            "(cut the object out first, e.g. with a background-removal tool)"
        )
    t = torch.from_numpy(image.astype("float32") / (65535.0 if image.dtype.name == "uint16" else 255.0))
    # Resize premultiplied colour so transparent pixels' (arbitrary) RGB does not bleed into edges.
    t = torch.cat([t[..., :3] * t[..., 3:], t[..., 3:]], -1)
    t = F.interpolate(t.permute(2, 0, 1)[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    t = t.permute(0, 2, 3, 1).clamp(0, 1)
    alpha = t[..., 3:]
    rgb = torch.where(alpha > 1e-6, t[..., :3] / alpha.clamp_min(1e-6), torch.zeros_like(t[..., :3]))
    return rgb.clamp(0, 1), alpha


class ReferenceViewGuidance(Guidance):
    Config = ReferenceViewConfig

    def __init__(self, config: ReferenceViewConfig, ctx: BuildContext, path: str = "guidance"):
        super().__init__(config, ctx)
        source = Path(config.image) if config.image else ctx.scene
        if source is None:
            raise UserError(f"{path}: the reference guidance needs an image (image: FILE) or a run reference (--scene FILE)")
        self.camera = make_cameras(config.elevation, config.azimuth, config.distance, config.fovy)
        self.settings = RenderSettings(config.resolution, config.resolution, shading="albedo", background="solid", training=True)
        self.source = Path(source)
        self._target: tuple[Tensor, Tensor] | None = None
        total = ctx.total_steps
        self.rgb_weight = Schedule.parse(config.rgb_weight, f"{path}.rgb_weight").resolve(total)
        self.mask_weight = Schedule.parse(config.mask_weight, f"{path}.mask_weight").resolve(total)

    def _load_target(self, background: Tensor) -> tuple[Tensor, Tensor]:
        if self._target is None:
            size = self.config.resolution
            if self.source.suffix.lower() in IMAGE_SUFFIXES:
                rgb, alpha = load_rgba(self.source, size)
            else:
                from distill3d.engine.references import load_reference

                ref = load_reference(self.source).render(self.camera, size, size, background=torch.zeros(1, size, size, 3))
                rgb, alpha = ref.rgb, ref.opacity  # over black: rgb is premultiplied colour
                rgb = torch.where(alpha > 0, rgb / alpha.clamp_min(1e-6), rgb)
            self._target = (rgb.to(background.device), alpha.to(background.device))
        rgb, alpha = self._target
        return rgb * alpha + background * (1 - alpha), alpha

    def active(self, step: int) -> bool:
        return step % max(self.config.every, 1) == 0

    def views(self, step: int) -> tuple[Cameras, RenderSettings]:
        return self.camera, self.settings

    def forward(self, out: RenderOutput, cameras: Cameras, step: int) -> dict[str, Tensor]:
        target_rgb, target_mask = self._load_target(out.background)
        terms = {"ref_rgb": self.rgb_weight(step) * F.mse_loss(out.rgb, target_rgb)}
        opacity = out.opacity.clamp(1e-5, 1 - 1e-5)
        if self.config.mask_loss == "bce":
            mask = F.binary_cross_entropy(opacity, target_mask)
        else:
            mask = F.mse_loss(opacity, target_mask)
        terms["ref_mask"] = self.mask_weight(step) * mask
        return terms
