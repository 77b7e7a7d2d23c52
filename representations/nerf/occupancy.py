"""Occupancy grid for empty-space skipping (Instant-NGP style).

A G^3 grid over the cube [-radius, radius]^3 holds a running max of density (decayed each
update). Cells whose density is above min(mean, threshold) are occupied; the occupied mask is
dilated by one cell so surfaces can still grow into their neighbourhood. Until `warmup_steps`
every cell counts as occupied.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class OccupancyConfig:
    enabled: bool = True
    resolution: int = 64
    update_every: int = 16
    warmup_steps: int = 64
    decay: float = 0.95
    # Occupied when density * step_size > alpha_threshold (or above the mean, whichever is lower).
    alpha_threshold: float = 0.01
    dilate: int = 1


class OccupancyGrid(nn.Module):
    def __init__(self, config: OccupancyConfig, radius: float):
        super().__init__()
        self.config = config
        self.radius = radius
        g = config.resolution
        self.register_buffer("density", torch.zeros(g, g, g))
        self.register_buffer("occupied", torch.ones(g, g, g, dtype=torch.bool))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def cell_index(self, points: Tensor) -> Tensor:
        """Integer cell (P, 3) of world points inside the grid's cube (truncation = floor there).
        The Triton marcher mirrors this arithmetic operation for operation."""
        g = self.config.resolution
        return (points * (0.5 * g / self.radius) + 0.5 * g).to(torch.int32).clamp_(0, g - 1)

    def __call__(self, points: Tensor) -> Tensor:
        """Occupied flags (P,) for world points (P, 3)."""
        g = self.config.resolution
        cell = self.cell_index(points)
        flat = (cell[:, 0] * (g * g) + cell[:, 1] * g + cell[:, 2]).long()
        return self.occupied.view(-1)[flat]

    def active(self) -> bool:
        return self.config.enabled and bool(self.initialized)

    @torch.no_grad()
    def update(self, step: int, density_fn: Callable[[Tensor], Tensor], step_size: float, chunk: int = 1 << 17) -> None:
        c = self.config
        if not c.enabled or step < c.warmup_steps or (step - c.warmup_steps) % c.update_every != 0:
            return
        g = c.resolution
        idx = torch.stack(torch.meshgrid(*(torch.arange(g, device=self.density.device),) * 3, indexing="ij"), -1).reshape(-1, 3)
        points = ((idx + torch.rand(idx.shape, device=idx.device)) / g * 2 - 1) * self.radius
        new = torch.cat([density_fn(p) for p in points.split(chunk)]).view(g, g, g)
        self.density.copy_(torch.maximum(self.density * c.decay, new) if bool(self.initialized) else new)
        threshold = min(float(self.density.mean()), c.alpha_threshold / step_size)
        occupied = self.density > threshold
        if c.dilate > 0:
            k = 2 * c.dilate + 1
            occupied = F.max_pool3d(occupied[None, None].float(), k, stride=1, padding=c.dilate)[0, 0] > 0
        if not bool(occupied.any()):
            # A collapsed field (no cell above the threshold) would leave no samples at all and
            # nothing to train: treat every cell as occupied until the density grows back.
            occupied.fill_(True)
        self.occupied.copy_(occupied)
        self.initialized.fill_(True)

    def occupied_fraction(self) -> float:
        return float(self.occupied.float().mean())
