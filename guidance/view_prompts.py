"""View-dependent prompts: direction buckets from the camera, and Perp-Neg's azimuth weights.

Conventions (engine/cameras.py): angles in degrees, azimuth in [-180, 180) with 0 the front view,
elevation positive above the object.

Direction buckets (DreamFusion, as in threestudio and stable-dreamfusion):
  overhead  elevation > 60
  front     |azimuth| < 45
  back      |azimuth| > 135
  side      otherwise
The comparisons are strict: azimuth 45 and 135 are "side", elevation 60 is not "overhead".
The prompt of a bucket is "<prompt>, <direction> view".

Perp-Neg azimuth interpolation (front half |az| < 90, back half |az| >= 90):
  front half: r = 1 - |az|/90; positive = r*front + (1-r)*side; negatives [front, side]
  back half:  r = 2 - |az|/90 (= 1 - (|az|-90)/90: the two published forms are the same line);
              positive = r*side + (1-r)*back; negatives [side, front]
  overhead:   positive = overhead prompt, both negative weights 0 (threestudio's rule; used for
              both weightings here: stable-dreamfusion ignores elevation, and the overhead bucket
              is rarely reached by the usual elevation ranges).
Negative weights w_i (negative numbers):
  "stable-dreamfusion" (the Perp-Neg authors' code; the default here), negative_w = -2,
  front_decay = 2, side_decay = 10:
    front half: w_front = 0 if r > 0.8 else exp(-front_decay r) negative_w
                w_side  = 0 if r < 0.2 else exp(-side_decay (1-r)) negative_w
    back half:  w_side  = 0 if r > 0.8 else exp(-side_decay r) negative_w / 2
                w_front = negative_w
  "threestudio": f(a, b, c; r) = a exp(-b r) + c, weights are -f:
    front half: w_front = -f_fs(r), w_side = -f_sf(1 - r)   with f_fs = f_sf = (4, 0.5, -2.426)
    back half:  w_side = -f_sb(r), w_front = -f_fsb(r)      with f_sb = (1, 0.5, -0.606), f_fsb = (1, 0.5, 0.967)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from distill3d.engine.cameras import Cameras, wrap_azimuth
from distill3d.engine.interfaces import Condition, RenderOutput

DIRECTIONS: tuple[str, ...] = ("front", "side", "back", "overhead")
FRONT, SIDE, BACK, OVERHEAD = range(4)

PerpNegWeighting = Literal["stable-dreamfusion", "threestudio"]


@dataclass(frozen=True)
class DirectionThresholds:
    """Bucket boundaries in degrees (strict comparisons, see the module docstring)."""

    overhead_elevation: float = 60.0
    front_azimuth: float = 45.0
    back_azimuth: float = 135.0


def view_directions(elevation: Tensor, azimuth: Tensor, thresholds: DirectionThresholds = DirectionThresholds()) -> Tensor:
    """Direction index (B,) into DIRECTIONS for each camera."""
    elevation = torch.as_tensor(elevation, dtype=torch.float32)
    az = wrap_azimuth(torch.as_tensor(azimuth, dtype=torch.float32)).abs()
    d = torch.full(az.shape, SIDE, dtype=torch.long, device=az.device)
    d = torch.where(az < thresholds.front_azimuth, torch.full_like(d, FRONT), d)
    d = torch.where(az > thresholds.back_azimuth, torch.full_like(d, BACK), d)
    d = torch.where(elevation.to(az.device) > thresholds.overhead_elevation, torch.full_like(d, OVERHEAD), d)
    return d


def camera_directions(cameras: Cameras, thresholds: DirectionThresholds = DirectionThresholds()) -> Tensor:
    return view_directions(cameras.elevation, cameras.azimuth, thresholds)


def view_prompt(prompt: str, direction: str | int) -> str:
    """"<prompt>, <direction> view" (the DreamFusion/threestudio suffix form)."""
    name = DIRECTIONS[direction] if isinstance(direction, int) else direction
    if name not in DIRECTIONS:
        raise ValueError(f"unknown view direction {name!r}; directions: {', '.join(DIRECTIONS)}")
    return f"{prompt}, {name} view"


def join_prompts(*parts: str) -> str:
    """Comma-join the non-empty parts ("ugly" + "face" -> "ugly, face")."""
    return ", ".join(p.strip() for p in parts if p and p.strip())


# ---------------------------------------------------------------------------------------------
# Perp-Neg interpolation weights


@dataclass
class PerpNegPlan:
    """Per-camera recipe for Perp-Neg, independent of the prior.

    positive_mix: (B, 4) convex weights over DIRECTIONS for the positive embedding.
    negative_directions: (B, K) direction indices of the negative prompts (K = 2).
    negative_weights: (B, K) weights w_i (<= 0) of the perpendicular negative terms.
    """

    positive_mix: Tensor
    negative_directions: Tensor
    negative_weights: Tensor


def shifted_exp_decay(a: float, b: float, c: float, r: Tensor) -> Tensor:
    """threestudio's f(a, b, c; r) = a exp(-b r) + c."""
    return a * torch.exp(-b * r) + c


def perp_neg_plan(
    elevation: Tensor,
    azimuth: Tensor,
    overhead: Tensor | None = None,
    weighting: PerpNegWeighting = "stable-dreamfusion",
    negative_w: float = -2.0,
    front_decay: float = 2.0,
    side_decay: float = 10.0,
    f_fs: tuple[float, float, float] = (4.0, 0.5, -2.426),
    f_sf: tuple[float, float, float] = (4.0, 0.5, -2.426),
    f_sb: tuple[float, float, float] = (1.0, 0.5, -0.606),
    f_fsb: tuple[float, float, float] = (1.0, 0.5, 0.967),
    thresholds: DirectionThresholds = DirectionThresholds(),
) -> PerpNegPlan:
    """Positive interpolation and negative weights for each camera (formulas in the module docstring)."""
    az = wrap_azimuth(torch.as_tensor(azimuth, dtype=torch.float32)).abs()
    elevation = torch.as_tensor(elevation, dtype=torch.float32).to(az.device)
    b = az.shape[0]
    if overhead is None:
        overhead = elevation > thresholds.overhead_elevation
    overhead = overhead.to(az.device).bool()
    front_half = az < 90.0
    r = torch.where(front_half, 1.0 - az / 90.0, 2.0 - az / 90.0)
    zero = torch.zeros_like(r)

    mix = torch.zeros(b, len(DIRECTIONS), dtype=torch.float32, device=az.device)
    mix[:, FRONT] = torch.where(front_half, r, zero)
    mix[:, SIDE] = torch.where(front_half, 1.0 - r, r)
    mix[:, BACK] = torch.where(front_half, zero, 1.0 - r)

    neg_dirs = torch.empty(b, 2, dtype=torch.long, device=az.device)
    neg_dirs[:, 0] = torch.where(front_half, FRONT, SIDE)
    neg_dirs[:, 1] = torch.where(front_half, SIDE, FRONT)

    if weighting == "stable-dreamfusion":
        w_front_fh = torch.where(r > 0.8, zero, torch.exp(-front_decay * r) * negative_w)
        w_side_fh = torch.where(r < 0.2, zero, torch.exp(-side_decay * (1.0 - r)) * negative_w)
        w_side_bh = torch.where(r > 0.8, zero, torch.exp(-side_decay * r) * negative_w / 2)
        w_front_bh = torch.full_like(r, negative_w)
    elif weighting == "threestudio":
        w_front_fh = -shifted_exp_decay(*f_fs, r)
        w_side_fh = -shifted_exp_decay(*f_sf, 1.0 - r)
        w_side_bh = -shifted_exp_decay(*f_sb, r)
        w_front_bh = -shifted_exp_decay(*f_fsb, r)
    else:
        raise ValueError(f"unknown Perp-Neg weighting {weighting!r}; use 'stable-dreamfusion' or 'threestudio'")
    weights = torch.stack(
        [torch.where(front_half, w_front_fh, w_side_bh), torch.where(front_half, w_side_fh, w_front_bh)], dim=1
    )

    if overhead.any():
        mix[overhead] = 0.0
        mix[overhead, OVERHEAD] = 1.0
        weights[overhead] = 0.0
    return PerpNegPlan(mix, neg_dirs, weights)


# ---------------------------------------------------------------------------------------------
# What a prior provides for view-dependent guidance


@dataclass
class ViewConditions:
    """Per-direction conditions of a text prior for a batch of cameras.

    directional: condition whose batch is the 4 DIRECTIONS in order (front, side, back, overhead),
                 each the embedding of "<prompt>, <direction> view".
    uncond:      the unconditional (negative-prompt) condition, one row per camera (B).
    direction:   (B,) bucket index of each camera (from the prior's own thresholds).
    """

    directional: Condition
    uncond: Condition
    direction: Tensor


@runtime_checkable
class ViewDependentPrior(Protocol):
    """A prior usable by Perp-Neg: it exposes its per-direction text conditions."""

    def view_conditions(self, cameras: Cameras, out: RenderOutput | None = None) -> ViewConditions: ...


def mix_condition(directional: Condition, mix: Tensor) -> Condition:
    """Per-camera convex combination of the 4 directional conditions: (B, 4) x (4, ...) -> (B, ...).

    Float tensors are interpolated; other tensors (token masks) take the dominant direction's row.
    """
    out: Condition = {}
    dominant = mix.argmax(dim=1)
    for key, value in directional.items():
        if value.is_floating_point():
            out[key] = torch.einsum("bd,d...->b...", mix.to(device=value.device, dtype=value.dtype), value)
        else:
            out[key] = value[dominant.to(value.device)]
    return out


def select_condition(directional: Condition, index: Tensor) -> Condition:
    """Rows of the directional condition by direction index (B,)."""
    return {k: v[index.to(v.device)] for k, v in directional.items()}
