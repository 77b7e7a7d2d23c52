"""Taubin (lambda|mu) mesh smoothing: removes the high-frequency bumps and grid stair-steps of
isosurface meshes without the shrinkage of plain Laplacian smoothing.

Each iteration is a shrinking umbrella step x += lambda L(x) followed by an inflating one
x += mu L(x) (mu < -lambda < 0), L(x)_i = mean of the neighbours of i - x_i. The pair is a low-pass
filter with pass-band frequency k_pb = 1/lambda + 1/mu (Taubin 1995, "A signal processing approach
to fair surface design"): k_pb = 0.1 with the defaults, so features spanning more than about ten
edges (primitive shapes, the object's silhouette) keep their size and position while facet-scale
noise is removed; the enclosed volume is preserved to within a fraction of a percent (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["SmoothingConfig", "taubin_smooth", "mesh_edges"]


@dataclass
class SmoothingConfig:
    iterations: int = 10  # lambda|mu pairs; 0 disables smoothing
    lam: float = 0.5
    mu: float = -0.53

    def __post_init__(self):
        if self.iterations < 0:
            raise ValueError(f"smoothing iterations must be >= 0, got {self.iterations}")
        if not (0 < self.lam < 1 and self.mu < -self.lam):
            raise ValueError(f"Taubin smoothing needs 0 < lam < 1 and mu < -lam, got lam={self.lam}, mu={self.mu}")


def mesh_edges(faces: Tensor) -> Tensor:
    """Unique undirected edges (E, 2) of a triangle mesh, smaller index first."""
    f = faces.long()
    e = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    return torch.unique(torch.sort(e, dim=-1).values, dim=0)


def taubin_smooth(vertices: Tensor, faces: Tensor, iterations: int = 10, lam: float = 0.5, mu: float = -0.53) -> Tensor:
    """Smoothed copy of vertices (V, 3); faces (F, 3) unchanged. Unreferenced vertices stay put."""
    if iterations <= 0 or faces.shape[0] == 0:
        return vertices.clone()
    e = mesh_edges(faces)
    src = torch.cat([e[:, 0], e[:, 1]])
    dst = torch.cat([e[:, 1], e[:, 0]])
    v = vertices.clone().to(torch.float64)
    deg = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device).index_add_(0, src, torch.ones_like(src, dtype=v.dtype))
    used = (deg > 0)[:, None]
    inv_deg = torch.where(deg > 0, 1.0 / deg.clamp_min(1), torch.zeros_like(deg))[:, None]

    def laplacian(x: Tensor) -> Tensor:
        return (torch.zeros_like(x).index_add_(0, src, x[dst]) * inv_deg - x) * used

    for _ in range(iterations):
        v = v + lam * laplacian(v)
        v = v + mu * laplacian(v)
    return v.to(vertices.dtype)
