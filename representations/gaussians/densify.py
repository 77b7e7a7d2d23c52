"""Adaptive density control of 3D Gaussians (3DGS / DreamGaussian): clone, split, prune, reset.

Statistic: the norm of the gradient of each Gaussian's projected mean, in normalised device
units (pixel gradient times half the image size, as 3DGS and gsplat measure it), summed over the
views where the Gaussian was visible and divided by how often it was. Every `interval` steps in
[start, stop]: Gaussians whose mean statistic reaches `grad_threshold` are cloned when small (max
scale <= percent_dense x scene_extent) or split into `split_count` samples drawn from themselves,
scales divided by 0.8 x split_count, when large; then Gaussians with opacity below `min_opacity`,
a world scale above `max_world_scale` x scene_extent or (optionally) a screen radius above
`max_screen_fraction` of the image are pruned. The count never exceeds `max_count` (the Gaussians
with the largest statistic win). Opacity reset: every `opacity_reset_interval` steps opacities are
clamped to at most `opacity_reset_value` and their optimiser moments zeroed.

The optimiser side goes through the trainer's hooks: `replace_parameter(old, new, source_rows)`
keeps Adam moments for surviving rows and gives new rows zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from distill3d.engine.errors import UserError


class AllGaussiansPrunedError(UserError):
    """Pruning would remove every Gaussian: the run stops with its last checkpoint intact."""


@dataclass
class DensifyConfig:
    enabled: bool = True
    start: int | str = 100  # steps (or "30%") after which densification begins
    stop: int | str = "70%"  # no densification or opacity reset after this step
    interval: int = 100
    grad_threshold: float = 0.01  # DreamGaussian's (3DGS uses 2e-4 for photometric losses)
    percent_dense: float = 0.01
    scene_extent: float = 4.0  # DreamGaussian passes 4 for its camera radius 2
    split_count: int = 2
    min_opacity: float = 0.005  # 3DGS's (DreamGaussian prunes at 0.01)
    max_world_scale: float = 0.1  # fraction of scene_extent
    max_screen_fraction: float = 0.0  # 0: off; else prune Gaussians wider than this fraction of the image
    opacity_reset_interval: int = 0  # 0: never
    opacity_reset_value: float = 0.01
    max_count: int = 500_000

    def __post_init__(self):
        checks = [
            (self.interval >= 1, f"densify.interval must be >= 1, got {self.interval}"),
            (self.grad_threshold > 0, f"densify.grad_threshold must be > 0, got {self.grad_threshold}"),
            (0 < self.percent_dense < 1, f"densify.percent_dense must lie in (0, 1), got {self.percent_dense}"),
            (self.scene_extent > 0, f"densify.scene_extent must be > 0, got {self.scene_extent}"),
            (2 <= self.split_count <= 16, f"densify.split_count must lie in 2..16, got {self.split_count}"),
            (0 <= self.min_opacity < 1, f"densify.min_opacity must lie in [0, 1), got {self.min_opacity}"),
            (self.max_world_scale > 0, f"densify.max_world_scale must be > 0, got {self.max_world_scale}"),
            (0 <= self.max_screen_fraction, f"densify.max_screen_fraction must be >= 0 (0 turns it off), got {self.max_screen_fraction}"),
            (self.opacity_reset_interval >= 0, f"densify.opacity_reset_interval must be >= 0 (0: never), got {self.opacity_reset_interval}"),
            (0 < self.opacity_reset_value < 1, f"densify.opacity_reset_value must lie in (0, 1), got {self.opacity_reset_value}"),
            (self.max_count >= 1, f"densify.max_count (the cap on the number of Gaussians) must be >= 1, got {self.max_count}"),
        ]
        checks.append((
            self.opacity_reset_interval == 0 or self.opacity_reset_value > self.min_opacity,
            f"densify.opacity_reset_value ({self.opacity_reset_value}) must exceed densify.min_opacity ({self.min_opacity}): "
            "a reset would otherwise prune every Gaussian",
        ))
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name in ("start", "stop"):
            v = getattr(self, name)
            if isinstance(v, str):
                if not (v.endswith("%") and _is_number(v[:-1]) and 0 <= float(v[:-1]) <= 100):
                    raise ValueError(f"densify.{name} must be a step or a percentage like '50%', got {v!r}")
            elif v < 0:
                raise ValueError(f"densify.{name} must be >= 0, got {v}")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def resolve_step(value: int | str, total: int) -> int:
    return int(round(float(value[:-1]) / 100 * total)) if isinstance(value, str) else int(value)


@dataclass
class DensifyPlan:
    """Rows of the new tensors: source row per new row (-1: new), how to fill new rows."""

    keep_old: Tensor  # (N,) bool, old rows that survive
    clone_src: Tensor  # (C,) old rows cloned
    split_src: Tensor  # (S,) old rows split (each into split_count new rows)
    prune_new: Tensor  # (C + S * k,) bool, new rows pruned right away


def select(grad_stat: Tensor, max_scale: Tensor, cfg: DensifyConfig) -> tuple[Tensor, Tensor]:
    """Old rows to clone and to split, capped so the count stays within max_count."""
    n = grad_stat.shape[0]
    candidates = (grad_stat >= cfg.grad_threshold).nonzero().squeeze(1)
    candidates = candidates[torch.argsort(grad_stat[candidates], descending=True, stable=True)]
    small = max_scale[candidates] <= cfg.percent_dense * cfg.scene_extent
    cost = torch.where(small, torch.ones_like(candidates), torch.full_like(candidates, cfg.split_count - 1))
    budget = cfg.max_count - n
    take = torch.cumsum(cost, 0) <= budget
    chosen, small = candidates[take], small[take]
    return torch.sort(chosen[small]).values, torch.sort(chosen[~small]).values


def split_samples(means: Tensor, rotations: Tensor, scales: Tensor, k: int) -> Tensor:
    """k positions per Gaussian drawn from it: mean + R (scale * eps). (S * k, 3), grouped by source."""
    eps = torch.randn(means.shape[0], k, 3, device=means.device, dtype=means.dtype)
    local = eps * scales[:, None, :]
    return (means[:, None, :] + torch.einsum("sij,skj->ski", rotations, local)).reshape(-1, 3)


def logit(p: float) -> float:
    return math.log(p / (1 - p))
