"""Reference-view losses: the render from the reference camera must match a known image.

Used for image-to-3D (the input photo) and with the oracle (an exact render of a scene).
Where the target comes from, first match wins:
  1. `image: FILE`: an RGBA image used as it is (no recentring), seen from this config's camera;
  2. the run's reference view (ctx.reference_view, from the recipe's `reference_view:` / --image:
     matted, recentred, with its camera and optional depth; engine/reference_view.py);
  3. the run's scene or mesh (ctx.scene), rendered exactly from this config's camera (with exact depth).

Terms (each weight a schedule, e.g. threestudio's ramps `{linear: [[0, 100], [200, 1000]]}`):
  ref_rgb     MSE of the render against the target composited over the render's background;
  ref_mask    MSE (or BCE) of opacity against the target alpha;
  ref_depth   1 - Pearson correlation of rendered depth and the target depth over the target's
              foreground (scale- and shift-invariant: monocular depth has neither);
  ref_normal  1 - cosine between the render's normals and the normals of the target depth's surface
              (distill3d.guidance.depth.normals_from_depth) over the foreground.
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
from distill3d.guidance.depth import normals_from_depth, pearson_loss

IMAGE_SUFFIXES = (".png", ".webp", ".tif", ".tiff")


@dataclass
class ReferenceLossConfig:
    image: str | None = None  # an RGBA image used as is; None: the run's reference view or scene
    # Camera of `image` / of the scene reference (a reference view brings its own camera).
    elevation: float = 0.0
    azimuth: float = 0.0
    distance: float = 3.2
    fovy: float = 42.5
    resolution: int = 64
    every: int = 1  # apply every N steps
    rgb_weight: ScheduleSpec = 1000.0
    mask_weight: ScheduleSpec = 100.0
    depth_weight: ScheduleSpec = 0.0
    normal_weight: ScheduleSpec = 0.0
    mask_loss: Literal["mse", "bce"] = "mse"


ReferenceViewConfig = ReferenceLossConfig  # the name this config had before image input existed


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


def _ever_positive(schedule: Schedule) -> bool:
    return any(value > 0 for _, value in schedule.points)


class ReferenceViewGuidance(Guidance):
    Config = ReferenceLossConfig

    def __init__(self, config: ReferenceLossConfig, ctx: BuildContext, path: str = "guidance"):
        super().__init__(config, ctx)
        total = ctx.total_steps
        self.rgb_weight = Schedule.parse(config.rgb_weight, f"{path}.rgb_weight").resolve(total)
        self.mask_weight = Schedule.parse(config.mask_weight, f"{path}.mask_weight").resolve(total)
        self.depth_weight = Schedule.parse(config.depth_weight, f"{path}.depth_weight").resolve(total)
        self.normal_weight = Schedule.parse(config.normal_weight, f"{path}.normal_weight").resolve(total)
        self.view = None
        self.source: Path | None = None
        if config.image:
            self.source = Path(config.image)
        elif ctx.reference_view is not None:
            self.view = ctx.reference_view
        elif ctx.scene is not None:
            self.source = Path(ctx.scene)
        else:
            raise UserError(
                f"{path}: the reference guidance needs an image: the input image (--image FILE, recipe key "
                "reference_view.image), an image of its own (image: FILE) or a scene (--scene FILE)"
            )
        if self.view is not None:
            self.camera = self.view.camera
        else:
            self.camera = make_cameras(config.elevation, config.azimuth, config.distance, config.fovy)
        self.use_depth = _ever_positive(self.depth_weight)
        self.use_normal = _ever_positive(self.normal_weight)
        has_depth = (self.view is not None and self.view.depth is not None) or (
            self.view is None and self.source is not None and self.source.suffix.lower() not in IMAGE_SUFFIXES
        )
        if (self.use_depth or self.use_normal) and not has_depth:
            raise UserError(
                f"{path}: depth_weight / normal_weight need a depth map of the input view: set reference_view.depth "
                "(a file, disparity:FILE, or estimate) or set the weights to 0"
            )
        self.settings = RenderSettings(
            config.resolution, config.resolution, shading="albedo", background="solid", need_normals=self.use_normal, training=True
        )
        self._cache: dict[str, Tensor] | None = None

    def _targets(self, device: torch.device) -> dict[str, Tensor]:
        """rgb, alpha and (when available) depth, normal at the loss resolution, computed once."""
        if self._cache is None:
            size = self.config.resolution
            depth = None
            if self.view is not None:
                rgb, alpha = self.view.rgb_alpha(size)
                if self.view.depth is not None:
                    from distill3d.engine.image_input import resize_depth

                    depth = resize_depth(self.view.depth, self.view.rgba[..., 3], size)
            elif self.source.suffix.lower() in IMAGE_SUFFIXES:
                rgb, alpha = load_rgba(self.source, size)
            else:
                from distill3d.engine.references import load_reference

                ref = load_reference(self.source).render(self.camera, size, size, background=torch.zeros(1, size, size, 3))
                rgb, alpha = ref.rgb, ref.opacity  # over black: rgb is premultiplied colour
                rgb = torch.where(alpha > 0, rgb / alpha.clamp_min(1e-6), rgb)
                depth = torch.where(alpha > 0, ref.depth / alpha.clamp_min(1e-6), ref.depth)
            target = {"rgb": rgb, "alpha": alpha}
            if depth is not None:
                target["depth"] = depth
                target["normal"] = normals_from_depth(depth, self.camera)
            self._cache = {k: v.to(device) for k, v in target.items()}
            self._target = (self._cache["rgb"], self._cache["alpha"])
        return self._cache

    def active(self, step: int) -> bool:
        return step % max(self.config.every, 1) == 0

    def views(self, step: int) -> tuple[Cameras, RenderSettings]:
        return self.camera, self.settings

    def forward(self, out: RenderOutput, cameras: Cameras, step: int) -> dict[str, Tensor]:
        target = self._targets(out.rgb.device)
        alpha = target["alpha"]
        target_rgb = target["rgb"] * alpha + out.background * (1 - alpha)
        terms = {"ref_rgb": self.rgb_weight(step) * F.mse_loss(out.rgb, target_rgb)}
        opacity = out.opacity.clamp(1e-5, 1 - 1e-5)
        if self.config.mask_loss == "bce":
            mask = F.binary_cross_entropy(opacity, alpha)
        else:
            mask = F.mse_loss(opacity, alpha)
        terms["ref_mask"] = self.mask_weight(step) * mask
        foreground = alpha > 0.5
        if self.use_depth:
            terms["ref_depth"] = self.depth_weight(step) * pearson_loss(out.depth, target["depth"], foreground)
        if self.use_normal:
            if out.normal is None:
                raise UserError("normal_weight needs normals from the representation's render; this representation gives none")
            fg = foreground[..., 0]
            if bool(fg.any()):
                cosine = F.cosine_similarity(out.normal[fg].float(), target["normal"][fg], dim=-1)
                terms["ref_normal"] = self.normal_weight(step) * (1 - cosine).mean()
            else:
                terms["ref_normal"] = out.normal.sum() * 0.0
        return terms
