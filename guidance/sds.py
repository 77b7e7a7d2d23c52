"""Score distillation sampling (DreamFusion), written once over the Prior interface.

Per step: encode the render into the prior's space (with gradient), draw t and noise, predict
the noise for [unconditional, conditional] in one batched call without gradient, combine with
classifier-free guidance (diffusers convention), grad = w(t) (eps_hat - eps), optionally clip,
and apply it through the target trick so d loss / d latents = grad / B.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from distill3d.engine.cameras import Cameras
from distill3d.engine.interfaces import BuildContext, Guidance, RenderOutput, build_prior, cat_conditions
from distill3d.engine.schedules import Schedule, ScheduleSpec
from distill3d.guidance.timesteps import (
    TimestepConfig,
    Weighting,
    classifier_free_guidance,
    sample_timesteps,
    sds_loss_from_grad,
    sds_weight,
)


@dataclass
class SDSConfig:
    # A prior declared under the recipe's `priors:` (by name, shared) or an inline plugin mapping.
    prior: str | dict[str, Any] = field(default_factory=lambda: {"name": "oracle"})
    weight: ScheduleSpec = 1.0
    guidance_scale: float = 100.0  # diffusers convention: 1.0 is the plain conditional model
    weighting: Weighting = "sds"
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    grad_clip: ScheduleSpec | None = None  # clamp grad to +-c (c may be scheduled)


class SDSGuidance(Guidance):
    Config = SDSConfig

    def __init__(self, config: SDSConfig, ctx: BuildContext, path: str = "guidance"):
        super().__init__(config, ctx)
        self.prior = build_prior(ctx, config.prior, f"{path}.prior")
        total = ctx.total_steps
        self.weight = Schedule.parse(config.weight, f"{path}.weight").resolve(total)
        self.grad_clip = None if config.grad_clip is None else Schedule.parse(config.grad_clip, f"{path}.grad_clip").resolve(total)

    def guided_noise(self, x_t: Tensor, t: Tensor, cameras: Cameras, out: RenderOutput) -> Tensor:
        """eps_hat for the batch: one prior call over [uncond; cond]. Subclasses (Perp-Neg) override."""
        cond, uncond = self.prior.conditions(cameras, out)
        eps = self.prior.predict_noise(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_conditions(uncond, cond))
        eps_uncond, eps_cond = eps.chunk(2)
        return classifier_free_guidance(eps_uncond, eps_cond, self.config.guidance_scale)

    def sds_grad(self, latents: Tensor, cameras: Cameras, out: RenderOutput, step: int) -> Tensor:
        """w(t) (eps_hat - eps) on the latents, clipped; isolated non-finite entries are zeroed."""
        prior = self.prior
        b = latents.shape[0]
        t = sample_timesteps(self.config.timesteps, b, step, self.ctx.total_steps, prior.num_train_timesteps, latents.device)
        noise = torch.randn_like(latents)
        with torch.no_grad():
            x_t = prior.add_noise(latents.detach(), noise, t)
            eps_hat = self.guided_noise(x_t, t, cameras, out)
            abar = prior.alphas_cumprod.to(latents.device)[t].view(b, *([1] * (latents.dim() - 1)))
            grad = sds_weight(self.config.weighting, abar) * (eps_hat.float() - noise)
            if self.grad_clip is not None:
                c = self.grad_clip(step)
                grad = grad.clamp(-c, c)
            finite = torch.isfinite(grad)
            if not bool(finite.any()):
                # Nothing usable (a prior that overflowed): keep it non-finite so the loss is NaN
                # and the trainer stops the run, instead of a silent zero loss.
                return grad
            grad = torch.where(finite, grad, torch.zeros_like(grad))
        return grad

    def forward(self, out: RenderOutput, cameras: Cameras, step: int) -> dict[str, Tensor]:
        latents = self.prior.encode_render(out)
        grad = self.sds_grad(latents, cameras, out, step)
        return {"sds": self.weight(step) * sds_loss_from_grad(latents, grad)}
