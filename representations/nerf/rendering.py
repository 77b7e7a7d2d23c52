"""Volume rendering over packed samples: ray marching with empty-space skipping, compositing.

Samples are "packed": a flat list sorted by ray, with `ray_indices` (S,) naming each sample's ray.
The torch functions here are the reference backends of the "march" and "composite" ops.

Compositing: alpha_i = 1 - exp(-sigma_i delta_i), T_i = prod_{j<i} (1 - alpha_j)
= exp(-sum_{j<i} sigma_j delta_j), w_i = T_i alpha_i; colour = sum w_i c_i, opacity = sum w_i,
depth = sum w_i t_i, normal = sum w_i n_i.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Samples:
    ray_indices: Tensor  # (S,) int64, sorted
    t_mid: Tensor  # (S,) distance of the sample point along its ray
    deltas: Tensor  # (S,) interval length
    n_rays: int


@dataclass
class Composited:
    weights: Tensor  # (S,)
    rgb: Tensor  # (R, 3)
    opacity: Tensor  # (R, 1)
    depth: Tensor  # (R, 1)
    normal: Tensor | None  # (R, 3)


def ray_sphere_bounds(origins: Tensor, dirs: Tensor, radius: float, min_near: float = 0.05) -> tuple[Tensor, Tensor, Tensor]:
    """Entry and exit distances of unit-direction rays through a centred sphere, and a hit mask."""
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    disc = b * b - c
    hit = disc > 0
    root = disc.clamp_min(0).sqrt()
    near = (-b - root).clamp_min(min_near)
    far = -b + root
    hit = hit & (far > near)
    return near, torch.where(hit, far, near), hit


def exclusive_segment_cumsum(values: Tensor, ray_indices: Tensor, n_rays: int) -> Tensor:
    """sum_{j<i, same ray} values_j for sorted packed samples (float64 to avoid cancellation)."""
    if values.numel() == 0:  # no sample on any ray (everything empty-space skipped)
        return values
    v = values.double()
    total = torch.cumsum(v, 0)
    exclusive = total - v
    # Value of `exclusive` at each ray's first sample: subtract it to restart the sum per ray.
    first = torch.full((n_rays,), -1, dtype=torch.long, device=values.device)
    positions = torch.arange(values.shape[0], device=values.device)
    first = first.scatter_reduce(0, ray_indices, positions, reduce="amin", include_self=False)
    start = exclusive[first.clamp_min(0)]
    return (exclusive - start[ray_indices]).to(values.dtype)


def composite_torch(
    sigmas: Tensor,
    rgbs: Tensor,
    samples: Samples,
    normals: Tensor | None = None,
) -> Composited:
    """Reference compositing of packed samples (differentiable in sigmas, rgbs and normals)."""
    n_rays, idx = samples.n_rays, samples.ray_indices
    tau = sigmas * samples.deltas
    alpha = 1 - torch.exp(-tau)
    transmittance = torch.exp(-exclusive_segment_cumsum(tau, idx, n_rays))
    weights = alpha * transmittance

    def accumulate(values: Tensor) -> Tensor:
        out = torch.zeros(n_rays, values.shape[-1], dtype=values.dtype, device=values.device)
        return out.index_add(0, idx, weights[:, None] * values)

    rgb = accumulate(rgbs)
    opacity = accumulate(torch.ones_like(tau)[:, None])
    depth = accumulate(samples.t_mid[:, None])
    normal = accumulate(normals) if normals is not None else None
    return Composited(weights, rgb, opacity, depth, normal)


def march_torch(
    origins: Tensor,
    dirs: Tensor,
    near: Tensor,
    far: Tensor,
    n_samples: int,
    occupied: "OccupancyQuery | None",
    jitter: "bool | Tensor",
) -> Samples:
    """Stratified samples between near and far, keeping only those in occupied cells.

    jitter: False (interval midpoints), True (uniform random offsets), or explicit offsets
    (R, n_samples) in [0, 1), so other backends can be compared on the same samples.

    origins, dirs: (R, 3); near, far: (R,). Rays with far <= near produce no samples. Only rays
    that enter the bounds are expanded to candidate samples, and the occupancy test runs before
    anything else is gathered, so the cost scales with the rays that can hit something.
    """
    n_rays = origins.shape[0]
    device = origins.device
    rays = torch.nonzero(far > near).squeeze(1)
    o, d, n0 = origins[rays], dirs[rays], near[rays]
    step = (far[rays] - n0) / n_samples
    u = torch.arange(n_samples, dtype=origins.dtype, device=device)
    if isinstance(jitter, Tensor):
        u = u + jitter[rays].to(origins.dtype)
    else:
        u = u + (torch.rand(rays.numel(), n_samples, device=device, dtype=origins.dtype) if jitter else 0.5)
    t_mid = torch.addcmul(n0[:, None], step[:, None], u)  # (r, S)
    if occupied is not None:
        points = torch.addcmul(o[:, None, :], d[:, None, :], t_mid[..., None])
        keep = occupied(points.view(-1, 3)).view(t_mid.shape)
        ray_slot, sample_slot = torch.nonzero(keep, as_tuple=True)
    else:
        ray_slot = torch.arange(rays.numel(), device=device).repeat_interleave(n_samples)
        sample_slot = torch.arange(n_samples, device=device).repeat(rays.numel())
    return Samples(rays[ray_slot], t_mid[ray_slot, sample_slot], step[ray_slot], n_rays)


class OccupancyQuery:
    """Callable protocol: points (P, 3) -> bool (P,) occupied."""

    def __call__(self, points: Tensor) -> Tensor:  # pragma: no cover - protocol
        raise NotImplementedError
