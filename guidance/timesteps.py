"""Timestep sampling and SDS weightings shared by every score-distillation guidance.

SDS weightings w(t) are functions `w(alphas_cumprod_t: Tensor) -> Tensor` (same shape) found by
name, like plugins:
  - an entry point in the group `distill3d.weightings` (the built-ins sds, uniform and
    fantasia3d register there, in this project's pyproject.toml, as a third party would):
        [project.entry-points."distill3d.weightings"]
        snr = "my_package.weights:snr_weighting"
  - or a function path "package.module:function" written straight into the recipe
    (`weighting: "my_package.weights:snr_weighting"`).
A recipe's weighting name is checked when the recipe is resolved; a bad one lists the available.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Annotated, Callable, Literal

import torch
from torch import Tensor

from distill3d.engine.config import ConfigError, bounded

TimestepSchedule = Literal["fixed", "linear", "sqrt", "deterministic"]
WEIGHTING_GROUP = "distill3d.weightings"
WeightingFn = Callable[[Tensor], Tensor]


# ----- SDS weightings -------------------------------------------------------------------------


def sds_weighting(abar: Tensor) -> Tensor:
    """w = 1 - abar_t (DreamFusion)."""
    return 1 - abar


def uniform_weighting(abar: Tensor) -> Tensor:
    """w = 1."""
    return torch.ones_like(abar)


def fantasia3d_weighting(abar: Tensor) -> Tensor:
    """w = sqrt(abar_t) (1 - abar_t) (Fantasia3D)."""
    return abar.sqrt() * (1 - abar)


_WEIGHTINGS: dict[str, WeightingFn] = {}


def available_weightings() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=WEIGHTING_GROUP)})


def get_weighting(name: str) -> WeightingFn:
    """The weighting function registered as `name` (entry point) or at "module:function"."""
    if name in _WEIGHTINGS:
        return _WEIGHTINGS[name]
    found = {}
    for ep in entry_points(group=WEIGHTING_GROUP):
        found.setdefault(ep.name, {})[ep.value] = ep
    listing = f"available: {', '.join(available_weightings()) or 'none'} (or a function path 'package.module:function')"
    if name in found:
        if len(found[name]) > 1:
            raise ConfigError(f"SDS weighting {name!r} is registered twice ({', '.join(found[name])}); uninstall one")
        ep = next(iter(found[name].values()))
        where = f"{ep.value}"
        loader = ep.load
    elif ":" in name:
        module, _, attr = name.partition(":")
        where = name
        loader = lambda: getattr(importlib.import_module(module), attr)  # noqa: E731
    else:
        raise ConfigError(f"unknown SDS weighting {name!r}; {listing}")
    try:
        fn = loader()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a broken plugin is reported, not raised raw
        raise ConfigError(f"SDS weighting {name!r} ({where}) failed to load: {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise ConfigError(f"SDS weighting {name!r} ({where}) is not a function")
    _WEIGHTINGS[name] = fn
    return fn


def _check_weighting(name: str, path: str) -> None:
    try:
        get_weighting(name)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# The recipe type of a weighting: a name checked by engine.config.from_dict when resolved.
Weighting = Annotated[str, _check_weighting]


def sds_weight(weighting: str, alphas_cumprod_t: Tensor) -> Tensor:
    """w(t) for the SDS gradient w(t) (eps_hat - eps)."""
    return get_weighting(weighting)(alphas_cumprod_t)


# ----- timesteps ------------------------------------------------------------------------------


@dataclass
class TimestepConfig:
    """Timesteps as fractions of the prior's T (1000 for SD); both bounds are reached."""

    t_min: float = bounded(0.02, min=0.0, max=1.0)
    t_max: float = bounded(0.98, min=0.0, max=1.0)
    # fixed: t ~ U[t_min, t_max]. linear: the upper bound anneals from t_max to t_max_end.
    # sqrt (HiFA): t = t_max - (t_max - t_min) sqrt(step / total).
    # deterministic (DreamGaussian): t = (1 - step / total) T clipped to [t_min, t_max].
    schedule: TimestepSchedule = "fixed"
    t_max_end: float = bounded(0.5, min=0.0, max=1.0)
    per_item: bool = False  # one t per batch item instead of one per batch

    def __post_init__(self):
        if self.t_min > self.t_max:
            raise ConfigError(f"t_min ({self.t_min}) is above t_max ({self.t_max})")


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
    # Both bounds inclusive: t in [0.02, 0.98] reaches 20 and 980 (round: 0.29 * 1000 is 289.99...).
    t_lo = min(int(round(lo * T)), T - 1)
    t_hi = min(max(int(round(hi * T)), t_lo), T - 1)
    n = batch if cfg.per_item else 1
    t = torch.randint(t_lo, t_hi + 1, (n,), dtype=torch.long)
    return t.expand(batch).clone().to(device) if n == 1 else t.to(device)


def classifier_free_guidance(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """diffusers convention: eps = eps_u + s (eps_c - eps_u); s = 1 is the conditional model.

    (threestudio's SD class writes eps_c + s (eps_c - eps_u), i.e. our s = its s + 1.)
    """
    return eps_uncond + scale * (eps_cond - eps_uncond)


def sds_loss_from_grad(latents: Tensor, grad: Tensor) -> Tensor:
    """Target trick: a loss whose gradient w.r.t. latents is grad / B."""
    target = (latents - grad).detach()
    return 0.5 * ((latents - target) ** 2).sum() / latents.shape[0]
