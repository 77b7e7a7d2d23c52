"""Refinement against multi-step denoised renders (DreamGaussian's second stage; SDEdit-like).

Per step: encode the render into the prior's space (no gradient), add noise up to the timestep
t_start = strength * T, run deterministic DDIM steps (eta 0) with the prior's classifier-free-
guided noise prediction down a grid of `ddim_steps` timesteps over [0, T) (the last step goes to
the clean estimate), decode, and take the mean squared error in image space between the render
(with gradient) and that detached target:

    loss = weight * mean((render - decode(DDIM(add_noise(encode(render), t_start))))^2)

DreamGaussian refines with strength 0.8 -> 0.95 of a 50-step DDIM schedule counted from the noisy
end, i.e. it starts denoising at about 0.2 T early in the stage and 0.05 T at its end: here
`strength` is that starting noise level as a fraction of T (SDEdit's convention), by default
annealed 0.2 -> 0.05 over the run. With the oracle prior at guidance scale 1 the denoised target
is the posterior mean around the exact view, so the loss pulls renders toward the true scene.
Works with any prior that implements decode_latents (oracle, oracle-zero123, biased-oracle,
Stable Diffusion, DeepFloyd IF, Zero123).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill3d.engine.cameras import Cameras
from distill3d.engine.config import ConfigError, bounded
from distill3d.engine.errors import UserError
from distill3d.engine.interfaces import BuildContext, Guidance, RenderOutput, build_prior, cat_conditions
from distill3d.engine.schedules import Schedule, ScheduleSpec
from distill3d.guidance.timesteps import classifier_free_guidance

__all__ = ["RefineConfig", "RefineGuidance", "ddim_timesteps"]


@dataclass
class RefineConfig:
    # A prior declared under the recipe's `priors:` (by name, shared) or an inline plugin mapping.
    prior: str | dict[str, Any] = field(default_factory=lambda: {"name": "oracle"})
    weight: ScheduleSpec = 1.0
    guidance_scale: float = 100.0  # diffusers convention: 1.0 is the plain conditional model
    # Noise level where denoising starts, as a fraction of T (may be scheduled; DreamGaussian ~0.2 -> 0.05).
    strength: ScheduleSpec = field(default_factory=lambda: {"linear": [[0, 0.2], ["100%", 0.05]]})
    ddim_steps: int = bounded(50, min=1, max=1000)  # the DDIM grid over [0, T) (DreamGaussian: 50)


def ddim_timesteps(num_train_timesteps: int, ddim_steps: int, t_start: float) -> list[int]:
    """Descending grid timesteps (diffusers' "leading" spacing, k * T // ddim_steps) at or below
    t_start; at least the lowest one."""
    ratio = max(num_train_timesteps // ddim_steps, 1)
    grid = [k * ratio for k in range(ddim_steps) if k * ratio < num_train_timesteps]
    picked = [t for t in grid if t <= t_start] or grid[:1]
    return picked[::-1]


class RefineGuidance(Guidance):
    Config = RefineConfig

    def __init__(self, config: RefineConfig, ctx: BuildContext, path: str = "guidance"):
        super().__init__(config, ctx)
        self.prior = build_prior(ctx, config.prior, f"{path}.prior")
        total = ctx.total_steps
        self.weight = Schedule.parse(config.weight, f"{path}.weight").resolve(total)
        self.strength = Schedule.parse(config.strength, f"{path}.strength").resolve(total)
        for _, value in self.strength.points:
            if not 0.0 < float(value) <= 1.0:
                raise ConfigError(f"{path}.strength: values must lie in (0, 1] (a fraction of the prior's timesteps), got {value}")

    def guided_noise(self, x_t: Tensor, t: int, cond, uncond) -> Tensor:
        b = x_t.shape[0]
        if self.config.guidance_scale == 1.0:  # the conditional model alone: one call
            steps = torch.full((b,), t, dtype=torch.long, device=x_t.device)
            return self.prior.predict_noise(x_t, steps, cond).float()
        steps = torch.full((2 * b,), t, dtype=torch.long, device=x_t.device)
        eps = self.prior.predict_noise(torch.cat([x_t, x_t]), steps, cat_conditions(uncond, cond)).float()
        eps_uncond, eps_cond = eps.chunk(2)
        return classifier_free_guidance(eps_uncond, eps_cond, self.config.guidance_scale)

    @torch.no_grad()
    def denoised(self, out: RenderOutput, cameras: Cameras, step: int) -> Tensor:
        """The target: the render noised to strength(step) * T and denoised by DDIM, (B, 3, H, W)."""
        prior = self.prior
        latents = prior.encode_render(out).float()
        T = prior.num_train_timesteps
        timesteps = ddim_timesteps(T, self.config.ddim_steps, float(self.strength(step)) * T)
        abar = prior.alphas_cumprod.to(latents.device, torch.float32)
        cond, uncond = prior.conditions(cameras, out)
        t0 = torch.full((latents.shape[0],), timesteps[0], dtype=torch.long, device=latents.device)
        x = prior.add_noise(latents, torch.randn_like(latents), t0)
        for i, t in enumerate(timesteps):
            eps = self.guided_noise(x, t, cond, uncond)
            a_t = abar[t]
            a_prev = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else abar.new_tensor(1.0)
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        try:
            images = prior.decode_latents(x)
        except NotImplementedError as exc:
            raise UserError(f"the refine guidance needs a prior that decodes into images: {exc}") from exc
        h, w = out.rgb.shape[1:3]
        if tuple(images.shape[-2:]) != (h, w):
            images = F.interpolate(images.float(), size=(h, w), mode="bilinear", align_corners=False)
        return images.to(out.rgb.device, torch.float32).clamp(0, 1)

    def forward(self, out: RenderOutput, cameras: Cameras, step: int) -> dict[str, Tensor]:
        target = self.denoised(out, cameras, step)
        loss = F.mse_loss(out.rgb_bchw().float(), target)
        return {"refine": self.weight(step) * loss}
