"""Perp-Neg (Armandpour et al. 2023) on top of SDS: view-dependent guidance against the Janus problem.

With deltas against the unconditional prediction, d_k = eps_k - eps_u, for the (azimuth-
interpolated) positive prompt and each negative direction prompt:

    eps = eps_u + s [ d_pos + sum_i w_i * perp(d_i, d_pos) ]
    perp(a, b) = a - (<a, b> / max(<b, b>, 1e-6)) b        inner products per sample over (C, H, W)

so each negative only removes what is orthogonal to the positive direction. s is the guidance
scale in the diffusers convention (s = 1 with no negatives is the plain conditional model). The
interpolation and the weights w_i (negative numbers depending on azimuth) are in
guidance/view_prompts.py: "stable-dreamfusion" (default) or "threestudio".

One prior call per step holds [uncond; pos; neg_1; neg_2] for every item. Negative slots whose
weight is zero for every item of the batch are left out of that call (they cannot change eps).

The prior must implement `view_conditions(cameras) -> ViewConditions` (see view_prompts.py); the
Stable Diffusion and DeepFloyd IF priors do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from distill3d.engine.cameras import Cameras
from distill3d.engine.config import ConfigError
from distill3d.engine.interfaces import BuildContext, RenderOutput, cat_conditions
from distill3d.guidance.sds import SDSConfig, SDSGuidance
from distill3d.guidance.view_prompts import (
    OVERHEAD,
    PerpNegPlan,
    PerpNegWeighting,
    ViewDependentPrior,
    mix_condition,
    perp_neg_plan,
    select_condition,
)


def perpendicular_component(x: Tensor, y: Tensor, eps: float = 1e-6) -> Tensor:
    """The part of x orthogonal to y, per sample (dot products over all non-batch dims)."""
    dims = tuple(range(1, x.dim()))
    dot = (x * y).sum(dim=dims, keepdim=True)
    norm2 = (y * y).sum(dim=dims, keepdim=True).clamp_min(eps)
    return x - dot / norm2 * y


def perp_neg_guidance(eps_uncond: Tensor, eps_pos: Tensor, eps_negs: Sequence[Tensor], weights: Tensor, scale: float) -> Tensor:
    """eps_u + s [d_pos + sum_i w_i perp(d_i, d_pos)]; weights (B, K) match eps_negs (K of (B, ...))."""
    d_pos = eps_pos - eps_uncond
    acc = torch.zeros_like(d_pos)
    shape = (-1,) + (1,) * (d_pos.dim() - 1)
    for i, eps_neg in enumerate(eps_negs):
        w = weights[:, i].to(d_pos.dtype).view(shape)
        acc = acc + w * perpendicular_component(eps_neg - eps_uncond, d_pos)
    return eps_uncond + scale * (d_pos + acc)


@dataclass
class PerpNegSDSConfig(SDSConfig):
    """SDS settings plus Perp-Neg's. guidance_scale multiplies the whole bracket (diffusers convention)."""

    perp_neg_weighting: PerpNegWeighting = "stable-dreamfusion"
    # stable-dreamfusion weighting (the Perp-Neg authors' defaults; negative_w in [-4, 0]).
    negative_w: float = -2.0
    front_decay: float = 2.0
    side_decay: float = 10.0
    # threestudio weighting: f(a, b, c; r) = a exp(-b r) + c, weight = -f.
    f_fs: tuple[float, float, float] = (4.0, 0.5, -2.426)
    f_sf: tuple[float, float, float] = (4.0, 0.5, -2.426)
    f_sb: tuple[float, float, float] = (1.0, 0.5, -0.606)
    f_fsb: tuple[float, float, float] = (1.0, 0.5, 0.967)
    # Leave negative slots with zero weight for the whole batch out of the UNet call.
    skip_zero_negatives: bool = True

    def __post_init__(self):
        if isinstance(self.prior, dict) and self.prior.get("view_dependent_prompts") is False:
            raise ConfigError(_NEEDS_VIEW_PROMPTS.format(path="prior"))


_NEEDS_VIEW_PROMPTS = (
    "Perp-Neg is built from the view-dependent prompts ('<prompt>, front view', side, back) but "
    "{path}.view_dependent_prompts is false: set it to true, or use plain 'sds' guidance"
)


class PerpNegSDSGuidance(SDSGuidance):
    """SDS whose guided noise is Perp-Neg's instead of plain classifier-free guidance."""

    Config = PerpNegSDSConfig

    def __init__(self, config: PerpNegSDSConfig, ctx: BuildContext, path: str = "guidance"):
        super().__init__(config, ctx, path)
        if not isinstance(self.prior, ViewDependentPrior):
            name = config.prior.get("name") if isinstance(config.prior, dict) else config.prior
            raise ConfigError(
                f"{path}: Perp-Neg needs a text prior with view-dependent prompts (stable-diffusion, deepfloyd-if); "
                f"prior {name!r} has no view_conditions()"
            )
        if getattr(getattr(self.prior, "config", None), "view_dependent_prompts", True) is False:
            raise ConfigError(f"{path}: " + _NEEDS_VIEW_PROMPTS.format(path="prior"))
        self.last_plan: PerpNegPlan | None = None

    def plan(self, cameras: Cameras, direction: Tensor) -> PerpNegPlan:
        c = self.config
        return perp_neg_plan(
            cameras.elevation,
            cameras.azimuth,
            overhead=direction == OVERHEAD,
            weighting=c.perp_neg_weighting,
            negative_w=c.negative_w,
            front_decay=c.front_decay,
            side_decay=c.side_decay,
            f_fs=c.f_fs,
            f_sf=c.f_sf,
            f_sb=c.f_sb,
            f_fsb=c.f_fsb,
        )

    def guided_noise(self, x_t: Tensor, t: Tensor, cameras: Cameras, out: RenderOutput) -> Tensor:
        views = self.prior.view_conditions(cameras)
        plan = self.plan(cameras, views.direction.cpu())
        self.last_plan = plan
        weights = plan.negative_weights
        keep = list(range(weights.shape[1]))
        if self.config.skip_zero_negatives:
            keep = [i for i in keep if bool((weights[:, i].abs() > 0).any())]
        positive = mix_condition(views.directional, plan.positive_mix)
        negatives = [select_condition(views.directional, plan.negative_directions[:, i]) for i in keep]
        n = 2 + len(negatives)
        b = x_t.shape[0]
        eps = self.prior.predict_noise(
            torch.cat([x_t] * n), torch.cat([t] * n), cat_conditions(views.uncond, positive, *negatives)
        )
        chunks = eps.split(b)
        w = weights[:, keep].to(eps.device)
        return perp_neg_guidance(chunks[0], chunks[1], chunks[2:], w, self.config.guidance_scale)
