"""The oracle Zero123: Zero123's interface answered from an exact scene (registry name `oracle-zero123`).

Like the real model it is given the input view and, per row, only the camera vector relative to
the input view ([d_polar, sin d_az, cos d_az, d_distance], guidance/priors/zero123.py); it never
reads the absolute training camera. It recovers the target camera from the input view's camera and
that vector (`camera_from_embedding`), renders the exact scene there, and predicts noise as the
oracle prior does (a Gaussian of std `noise_std` around that render, guidance/priors/oracle.py).
So a run with it goes through the same guidance code as one with the real model: the camera-vector
conditioning, the unconditional rows (weight 0: the grey mean) and classifier-free guidance.

As with the real model, the camera vector says nothing about the field of view or the look-at
point: the oracle assumes every view has the input view's field of view (or `fovy`) and looks at
the origin, so recipes with it sample fixed-fovy, unperturbed cameras. The rendered views are
composited over the render's own background (passed in the condition, as the oracle prior does), so
random backgrounds work.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import Tensor

from distill3d.engine.cameras import Cameras, make_cameras
from distill3d.engine.interfaces import BuildContext, Condition, RenderOutput
from distill3d.guidance.priors.oracle import OracleConfig, OraclePrior
from distill3d.guidance.priors.zero123 import CameraVector, ReferenceCameraPrior, camera_from_embedding


@dataclass
class OracleZero123Config(OracleConfig):
    # scene: null -> the run's scene (recipe `scene`, demo --scene); the input view is the run's
    # reference_view (ctx.reference_view).
    camera_vector: CameraVector = "zero123"
    fovy: float | None = None  # field of view of every view; null: the input view's


class OracleZero123Prior(ReferenceCameraPrior, OraclePrior):
    Config = OracleZero123Config

    def __init__(self, config: OracleZero123Config, ctx: BuildContext, path: str = "prior"):
        super().__init__(config, ctx)  # OraclePrior: the scene and the noise schedule
        self.setup_reference(ctx, path)
        self.fovy = float(config.fovy if config.fovy is not None else self.reference_view.camera.fovy[0])

    def conditions(self, cameras: Cameras, out: RenderOutput) -> tuple[Condition, Condition]:
        cond, uncond = ReferenceCameraPrior.conditions(self, cameras, out)
        background = out.background.detach().float().permute(0, 3, 1, 2)  # (B, 3, H, W)
        cond["background"], uncond["background"] = background, background
        return cond, uncond

    def target_cameras(self, camera_vectors: Tensor) -> Cameras:
        """The cameras the vectors describe, from the input view's camera alone."""
        elevation, azimuth, distance = camera_from_embedding(
            camera_vectors.cpu(), self.ref_elevation, self.ref_azimuth, self.ref_distance, self.config.camera_vector
        )
        return make_cameras(elevation, azimuth, distance, torch.full_like(elevation, self.fovy))

    @torch.no_grad()
    def predict_noise(self, x_t: Tensor, t: Tensor, condition: Condition, is_conditional: Tensor | None = None) -> Tensor:
        weight = self.condition_weight(condition, is_conditional, x_t.device)
        b, _, h, w = x_t.shape
        gray = 2.0 * self.config.unconditional_gray - 1.0
        mean = torch.full_like(x_t, gray)
        rows = torch.nonzero(weight[:, 0] > 0.5).flatten()
        if rows.numel():
            cams = self.target_cameras(condition["camera"][rows])
            background = condition["background"][rows].permute(0, 2, 3, 1).cpu()
            if tuple(background.shape[1:3]) != (h, w):
                background = torch.nn.functional.interpolate(background.permute(0, 3, 1, 2), size=(h, w), mode="bilinear").permute(0, 2, 3, 1)
            ref = self.scene.render(cams, h, w, background=background)
            mean[rows] = (ref.rgb.permute(0, 3, 1, 2).to(x_t.device, x_t.dtype)) * 2 - 1
        return OraclePrior.predict_noise(self, x_t, t, {"mean": mean})
