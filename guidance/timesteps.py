"""Timestep sampling and SDS weightings shared by every score-distillation guidance."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

TimestepSchedule = Literal["fixed", "linear", "sqrt", "deterministic"]
Weighting = Literal["sds", "uniform", "fantasia3d"]


@dataclass
class TimestepConfig:
    """Timesteps as fractions of the prior's T (1000 for SD)."""

    t_min: float = 0.02
    t_max: float = 0.98
    # fixed: t ~ U[t_min, t_max]. linear: the upper bound anneals from t_max to t_max_end.
    # sqrt (HiFA): t = t_max - (t_max - t_min) sqrt(step / total).
    # deterministic (DreamGaussian): t = (1 - step / total) T clipped to [t_min, t_max].
    schedule: TimestepSchedule = "fixed"
    t_max_end: float = 0.5
    per_item: bool = False  # one t per batch item instead of one per batch


def sample_timesteps(cfg: TimestepConfig, batch: int, step: int, total_steps: int, num_train_timesteps: int, device=None) -> Tensor:
    """Integer timesteps (batch,) for this training step."""
    T = num_train_timesteps
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    lo, hi = cfg.t_min, cfg.t_max
    if cfg.schedule in ("sqrt", "deterministic"):
        if cfg.schedule == "sqrt":
            frac = hi - (hi - lo) * math.sqrt(progress)
        else:
            frac = min(max(1.0 - progress, lo), hi)
        return torch.full((batch,), int(round(frac * T)), dtype=torch.long, device=device).clamp(0, T - 1)
    if cfg.schedule == "linear":
        hi = hi + (cfg.t_max_end - hi) * progress
    elif cfg.schedule != "fixed":
        raise ValueError(f"unknown timestep schedule {cfg.schedule!r}; use fixed, linear, sqrt or deterministic")
    t_lo, t_hi = int(lo * T), max(int(hi * T), int(lo * T) + 1)
    n = batch if cfg.per_item else 1
    t = torch.randint(t_lo, t_hi, (n,), dtype=torch.long)
    return t.expand(batch).clone().to(device) if n == 1 else t.to(device)


def sds_weight(weighting: Weighting, alphas_cumprod_t: Tensor) -> Tensor:
    """w(t) for the SDS gradient w(t) (eps_hat - eps)."""
    abar = alphas_cumprod_t
    if weighting == "sds":  # DreamFusion
        return 1 - abar
    if weighting == "uniform":
        return torch.ones_like(abar)
    if weighting == "fantasia3d":
        return abar.sqrt() * (1 - abar)
    raise ValueError(f"unknown SDS weighting {weighting!r}; use sds, uniform or fantasia3d")


def classifier_free_guidance(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """diffusers convention: eps = eps_u + s (eps_c - eps_u); s = 1 is the conditional model.

    (threestudio's SD class writes eps_c + s (eps_c - eps_u), i.e. our s = its s + 1.)
    """
    return eps_uncond + scale * (eps_cond - eps_uncond)


def sds_loss_from_grad(latents: Tensor, grad: Tensor) -> Tensor:
    """Target trick: a loss whose gradient w.r.t. latents is grad / B."""
    target = (latents - grad).detach()
    return 0.5 * ((latents - target) ** 2).sum() / latents.shape[0]
