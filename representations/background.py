"""Backgrounds every renderer composites over: solid, random (per image) or learned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

BackgroundKind = Literal["solid", "random", "learned"]


@dataclass
class BackgroundConfig:
    kind: BackgroundKind = "random"
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)  # solid colour, and the eval colour
    # Random backgrounds are one uniform colour per image; this fraction of training images uses
    # the solid colour instead (keeps renders on white sensible for priors trained on white).
    solid_fraction: float = 0.0


class Background(nn.Module):
    """Colour behind each pixel as (B, H, W, 3). "learned" is a small MLP of the ray direction
    (threestudio's neural environment map)."""

    def __init__(self, config: BackgroundConfig):
        super().__init__()
        self.config = config
        if config.kind == "learned":
            self.mlp = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, dirs: Tensor, kind: str | None = None) -> Tensor:
        """dirs: (B, H, W, 3) unit ray directions."""
        kind = kind or self.config.kind
        b, h, w, _ = dirs.shape
        solid = torch.tensor(self.config.color, dtype=dirs.dtype, device=dirs.device)
        if kind == "solid":
            return solid.expand(b, h, w, 3)
        if kind == "random":
            colors = torch.rand(b, 1, 1, 3, device=dirs.device, dtype=dirs.dtype)
            if self.config.solid_fraction > 0:
                use_solid = torch.rand(b, 1, 1, 1, device=dirs.device) < self.config.solid_fraction
                colors = torch.where(use_solid, solid.view(1, 1, 1, 3), colors)
            return colors.expand(b, h, w, 3)
        if kind == "learned":
            if not hasattr(self, "mlp"):
                raise ValueError("a learned background needs background.kind: learned in the config")
            return torch.sigmoid(self.mlp(dirs))
        raise ValueError(f"unknown background kind {kind!r}; use solid, random or learned")
