"""Example representation plugin: a dense voxel grid of density and colour.

A representation is an nn.Module with a `Config` dataclass, constructed as Cls(config, ctx), that
owns its parameters and renders cameras into a RenderOutput (channels-last images). Registering
it is one entry point in this package's pyproject.toml:

    [project.entry-points."distill3d.representations"]
    voxel-grid = "distill3d_example_voxels:VoxelGrid"

After `pip install ./plugins/example_representation`, recipes can use it:

    representation: {name: voxel-grid, resolution: 48}

and `python -m pytest` on distill3d.plugins.contract checks it (see contract_settings below).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill3d.engine.cameras import pixel_rays
from distill3d.engine.interfaces import Representation, RenderOutput


@dataclass
class VoxelGridConfig:
    resolution: int = 32  # cells per side of the grid covering [-radius, radius]^3
    radius: float = 1.0
    samples_per_ray: int = 64
    lr: float = 0.1
    init_density: float = -2.0  # pre-activation density: starts faint (opacity about 0.2 through the grid)

    def __post_init__(self):
        if self.resolution < 2 or self.samples_per_ray < 2:
            raise ValueError("resolution and samples_per_ray must be at least 2")


class VoxelGrid(Representation):
    """Density (softplus) and albedo (sigmoid) on a dense grid, trilinearly interpolated and
    alpha-composited along each ray over a white background."""

    Config = VoxelGridConfig
    contract_settings = {"resolution": 8, "samples_per_ray": 16}  # small settings for the contract tests

    def __init__(self, config: VoxelGridConfig, ctx):
        super().__init__(config, ctx)
        n = config.resolution
        self.density = nn.Parameter(torch.full((1, 1, n, n, n), config.init_density))
        self.albedo = nn.Parameter(torch.zeros(1, 3, n, n, n))

    def param_groups(self) -> list[dict]:
        return [{"name": "grid", "params": [self.density, self.albedo], "lr": self.config.lr}]

    def sample(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density (N,) and albedo (N, 3) at world points (N, 3); zero density outside the grid."""
        grid = (points / self.config.radius).view(1, -1, 1, 1, 3)  # grid_sample wants (x, y, z) in [-1, 1]
        raw = F.grid_sample(self.density, grid, align_corners=True).view(-1)
        rgb = F.grid_sample(self.albedo, grid, align_corners=True).view(3, -1).t()
        inside = (points.abs() <= self.config.radius).all(-1)
        return F.softplus(raw) * inside, torch.sigmoid(rgb)

    def render(self, cameras, settings) -> RenderOutput:
        b, h, w, s = len(cameras), settings.height, settings.width, self.config.samples_per_ray
        origins, dirs = pixel_rays(cameras, h, w)
        o, d = origins.reshape(-1, 1, 3), dirs.reshape(-1, 1, 3)
        centre = -(o * d).sum(-1)  # (R, 1): distance along the ray closest to the origin
        reach = self.config.radius * 3**0.5
        t = centre + torch.linspace(-reach, reach, s, device=o.device)  # (R, S)
        sigma, albedo = self.sample((o + t[..., None] * d).reshape(-1, 3))
        delta = 2 * reach / (s - 1)
        alpha = 1 - torch.exp(-sigma.view(-1, s) * delta)
        transmittance = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1 - alpha[:, :-1] + 1e-10], 1), 1)
        weights = alpha * transmittance  # (R, S)
        opacity = weights.sum(1, keepdim=True)
        background = torch.ones(b, h, w, 3, device=o.device)
        rgb = (weights[..., None] * albedo.view(-1, s, 3)).sum(1).view(b, h, w, 3) + (1 - opacity.view(b, h, w, 1)) * background
        depth = (weights * t).sum(1).view(b, h, w, 1)
        return RenderOutput(rgb=rgb, opacity=opacity.view(b, h, w, 1), depth=depth, background=background)
