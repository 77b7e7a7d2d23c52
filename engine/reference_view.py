"""The image-to-3D input as one object: the reference image (RGBA) and the camera it was seen from.

Reference-view losses and view-conditioned priors (Zero123) read the same ReferenceView from the
build context (`ctx.reference_view`), so the image, its preprocessing and its camera are decided
once per run. The recipe key is `reference_view:`; `distill3d generate --image FILE` fills it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from distill3d.engine.cameras import Cameras, make_cameras


@dataclass
class ReferenceViewConfig:
    image: str | None = None  # the input photo (RGBA, or RGB on a plain background)
    elevation: float = 0.0  # degrees; the camera the photo was taken from (azimuth 0 = front)
    azimuth: float = 0.0
    distance: float = 3.8
    fovy: float = 20.0
    size: int = 256  # the preprocessed square image
    # the object's longer side fills this fraction of the square; null keeps the image's framing
    # (an exact render used as input, as the oracle image-to-3D demo does)
    foreground_fraction: float | None = 0.8
    matting: Literal["auto", "alpha", "border", "rembg"] = "auto"
    depth: str | None = None  # a depth map file, "estimate" (monocular estimator), or None

    def __post_init__(self):
        if self.size < 32:
            raise ValueError(f"size must be at least 32, got {self.size}")
        if self.foreground_fraction is not None and not 0.1 <= self.foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must lie in [0.1, 1], got {self.foreground_fraction}")
        if not (self.distance > 0 and 0 < self.fovy < 180):
            raise ValueError(f"need distance > 0 and 0 < fovy < 180, got {self.distance} and {self.fovy}")


@dataclass
class ReferenceView:
    rgba: Tensor  # (H, W, 4) straight alpha in [0, 1], recentred and scaled
    camera: Cameras  # batch of 1
    depth: Tensor | None = None  # (H, W), larger = farther, only where alpha > 0.5 matters
    source: Path | None = None

    @property
    def elevation(self) -> float:
        return float(self.camera.elevation[0])

    @property
    def azimuth(self) -> float:
        return float(self.camera.azimuth[0])

    @property
    def distance(self) -> float:
        return float(self.camera.distance[0])

    def rgb_alpha(self, size: int) -> tuple[Tensor, Tensor]:
        """RGB (1, size, size, 3) and alpha (1, size, size, 1), resized premultiplied so
        transparent pixels' colour does not bleed into the edges."""
        t = self.rgba
        pre = torch.cat([t[..., :3] * t[..., 3:], t[..., 3:]], -1).permute(2, 0, 1)[None]
        if pre.shape[-1] != size or pre.shape[-2] != size:
            pre = F.interpolate(pre, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        pre = pre.permute(0, 2, 3, 1).clamp(0, 1)
        alpha = pre[..., 3:]
        rgb = torch.where(alpha > 1e-6, pre[..., :3] / alpha.clamp_min(1e-6), torch.zeros_like(pre[..., :3]))
        return rgb.clamp(0, 1), alpha

    def over_white(self, size: int) -> Tensor:
        """(1, 3, size, size) composited over white: what Zero123 was trained to see."""
        rgb, alpha = self.rgb_alpha(size)
        return (rgb * alpha + (1 - alpha)).permute(0, 3, 1, 2)


def reference_camera(config: ReferenceViewConfig) -> Cameras:
    return make_cameras(config.elevation, config.azimuth, config.distance, config.fovy)


def load_reference_view(config: ReferenceViewConfig, run_dir: Path | None) -> ReferenceView:
    """Read and preprocess the input image (engine/image_input.py), write what the model will see
    to RUN/reference.png, and attach the reference camera."""
    from distill3d.engine.errors import UserError
    from distill3d.engine.image_input import preprocess_image, save_rgba

    if config.image is None:
        raise UserError("reference_view.image is not set: give the input photo (distill3d generate --image FILE)")
    # The depth map is cropped and scaled with the image, so preprocessing returns both.
    rgba, depth = preprocess_image(Path(config.image), config.size, config.foreground_fraction, config.matting, config.depth)
    if run_dir is not None:
        save_rgba(rgba, Path(run_dir) / "reference.png")
    return ReferenceView(rgba=rgba, camera=reference_camera(config), depth=depth, source=Path(config.image))


def render_input_image(scene: str | Path, path: Path, view: dict, elevation: float) -> Path:
    """An exact render of `scene` from the reference camera (`view`: a recipe's reference_view
    data; its distance, fovy and size are used) saved as straight-alpha RGBA: the offline
    image-to-3D input of the demo and the Janus benchmark."""
    from distill3d.engine.image_input import save_rgba
    from distill3d.engine.references import load_reference

    config = ReferenceViewConfig(**{k: v for k, v in view.items() if k in ("distance", "fovy", "size")}, elevation=elevation)
    size = config.size
    ref = load_reference(scene).render(reference_camera(config), size, size, background=torch.zeros(1, size, size, 3))
    alpha = ref.opacity[0]
    rgb = torch.where(alpha > 0, ref.rgb[0] / alpha.clamp_min(1e-6), ref.rgb[0])
    save_rgba(torch.cat([rgb, alpha], -1).clamp(0, 1), path)
    return path
