"""The oracle prior: an exact, weightless diffusion model of one analytic reference scene.

Its data distribution at camera c is a Gaussian around the exact render of the reference scene
(:mod:`distill3d.engine.reference_scene`) in pixel space [-1, 1]:

    x0 | c ~ N(mu_c, s^2 I),        mu_c = 2 * render_c - 1,   s = ``noise_std``

and the unconditional distribution is N(mu_u, s^2 I) with mu_u the constant grey
2 * ``unconditional_gray`` - 1. With the forward process x_t = sqrt(abar) x0 + sqrt(1 - abar) eps,
x_t | c ~ N(sqrt(abar) mu_c, (abar s^2 + 1 - abar) I), and the optimal (MMSE) noise prediction is
-sqrt(1 - abar) times the score:

    eps_hat(x_t, t, c) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu_c) / (abar_t s^2 + 1 - abar_t).

Why guidance scale 1 reproduces the scene exactly
-------------------------------------------------
SDS noises the render x as x_t = sqrt(abar) x + sqrt(1 - abar) eps, so

    eps_hat_c - eps = k_t (x - mu_c) - (abar s^2 / (abar s^2 + 1 - abar)) eps,
    k_t = sqrt(abar (1 - abar)) / (abar s^2 + 1 - abar) > 0.

The second term has zero mean, so the expected SDS gradient is w(t) k_t (x - mu_c): gradient
descent pulls every view straight toward the exact render. With classifier-free guidance
(diffusers convention, eps = eps_u + g (eps_c - eps_u)) the expectation becomes

    w(t) k_t (x - [(1 - g) mu_u + g mu_c]),

i.e. the fixed point is (1 - g) mu_u + g mu_c: g = 1 gives mu_c, the scene itself; g < 1 washes
it toward the grey mu_u; g > 1 extrapolates away from grey (over-saturated colours, the familiar
look of high-CFG SDS, clipped by the [0, 1] renderer). The oracle demo therefore uses
``guidance_scale: 1``. Because every mu_c is a render of one 3D scene, a 3D representation can
reach all these fixed points at once; the demo's quality metric (PSNR against exact renders,
through the ``scene`` attribute) then measures the engine (cameras, renderer, optimiser, SDS
plumbing), not a learned prior. The zero-mean noise term vanishes as s -> 0.

Conditions are dicts ``{"mean": (B, 3, h, w)}``; the conditional mean is rendered at the
training render's resolution over the training render's own background, so the oracle agrees
with whatever background the representation composited (random or learned backgrounds included).
It is also shaded as the training render was (``RenderOutput.extras``: shading mode, lights,
ambient/diffuse; representations/shading.py): a Lambertian or textureless render is compared with
the exact scene lit by the same light, as a real diffusion model sees shading in its images.
Unlit (albedo) renders, the default, are compared with the unlit scene.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from distill3d.engine.cameras import Cameras
from distill3d.engine.interfaces import BuildContext, Condition, Prior, RenderOutput
from distill3d.engine.reference_scene import DEFAULT_SCENE
from distill3d.engine.references import load_reference
from distill3d.representations.shading import shade_like_render


@dataclass
class OracleConfig:
    # Scene file (JSON/YAML) or built-in scene name; None: the run's scene (recipe `scene`)
    # if set, else the default scene.
    scene: str | None = None
    noise_std: float = 0.1  # s: std of the data distribution around the exact render, in [-1, 1] units
    image_size: int | None = None  # None: the render's size; else renders and means are resized to this
    unconditional_gray: float = 0.5  # mean of the unconditional distribution: this grey, in [0, 1]
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085  # SD "scaled_linear" schedule
    beta_end: float = 0.012

    def __post_init__(self):
        if not self.noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"image_size must be positive or null, got {self.image_size}")
        if not 0.0 <= self.unconditional_gray <= 1.0:
            raise ValueError(f"unconditional_gray must lie in [0, 1], got {self.unconditional_gray}")
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {self.num_train_timesteps}")
        if not 0.0 < self.beta_start <= self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {self.beta_start} and {self.beta_end}")


def scaled_linear_alphas_cumprod(beta_start: float, beta_end: float, num_train_timesteps: int) -> Tensor:
    """Stable Diffusion's schedule: betas = linspace(sqrt(b0), sqrt(b1), T)^2; cumprod(1 - betas)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


class PixelSpacePrior(Prior):
    """A prior whose "latents" are the images themselves in [-1, 1] (at config.image_size when set):
    the oracles' space, shared so encoding and decoding are written once."""

    def _resize(self, images: Tensor) -> Tensor:
        size = self.config.image_size
        if size is None or tuple(images.shape[-2:]) == (size, size):
            return images
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)

    def encode_images(self, rgb: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> [-1, 1], resized to image_size if set; differentiable."""
        return self._resize(rgb) * 2 - 1

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> Tensor:
        """[-1, 1] pixels -> [0, 1] images (at image_size when set)."""
        return ((latents.float() + 1) / 2).clamp(0, 1)


class OraclePrior(PixelSpacePrior):
    """Gaussian-around-the-exact-render prior in pixel space [-1, 1] (see the module docstring)."""

    Config = OracleConfig

    def __init__(self, config: OracleConfig, ctx: BuildContext):
        super().__init__(config, ctx)
        if config.scene is not None:
            source: str | Path = config.scene
        elif ctx.scene is not None:
            source = ctx.scene
        else:
            source = DEFAULT_SCENE
        # Any reference with an exact render: analytic scene file or mesh file.
        self.scene = load_reference(source)
        self.num_train_timesteps = config.num_train_timesteps
        self.register_buffer(
            "alphas_cumprod",
            scaled_linear_alphas_cumprod(config.beta_start, config.beta_end, config.num_train_timesteps),
            persistent=False,
        )

    @torch.no_grad()
    def reference_render(self, cameras: Cameras, height: int, width: int, background: Tensor | None = None) -> RenderOutput:
        """Exact render of the reference scene (for metrics and conditions)."""
        return self.scene.render(cameras, height, width, background=background)

    @torch.no_grad()
    def exact_render_like(self, cameras: Cameras, out: RenderOutput, background: Tensor | None) -> Tensor:
        """The exact render (B, H, W, 3) at out's size, shaded as out was (its extras' shading mode,
        lights, ambient/diffuse; albedo renders stay albedo): a real diffusion model sees shading,
        and shaded views are what tell a flat face from a wavy one inside the silhouette."""
        b, h, w = out.rgb.shape[:3]
        if out.extras.get("shading", "albedo") == "albedo":
            return self.scene.render(cameras, h, w, background=background).rgb
        ref = self.scene.render(cameras, h, w, background=torch.zeros(1, 1, 1, 3))
        mask = ref.opacity
        colour = shade_like_render(out.extras, ref.rgb, ref.normal)
        under = torch.ones_like(colour) if background is None else background.to(colour.device, colour.dtype).expand_as(colour)
        return colour * mask + (1 - mask) * under

    @torch.no_grad()
    def conditions(self, cameras: Cameras, out: RenderOutput) -> tuple[Condition, Condition]:
        """({"mean": mu_c}, {"mean": mu_u}): the exact render at out's resolution over out's background."""
        b, h, w = out.rgb.shape[:3]
        if len(cameras) != b:
            raise ValueError(f"oracle conditions: {len(cameras)} cameras for a batch of {b} renders")
        background = None if out.background is None else out.background.detach()
        rgb = self.exact_render_like(cameras, out, background)
        mean = self.encode_images(rgb.permute(0, 3, 1, 2).to(out.rgb.device, torch.float32))
        gray = 2.0 * self.config.unconditional_gray - 1.0
        return {"mean": mean}, {"mean": torch.full_like(mean, gray)}

    @torch.no_grad()
    def predict_noise(self, x_t: Tensor, t: Tensor, condition: Condition, is_conditional: Tensor | None = None) -> Tensor:
        """eps_hat = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t)."""
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1)
        abar = self.alphas_cumprod[t.to(self.alphas_cumprod.device)].to(x_t.device, x_t.dtype)
        abar = abar.view(-1, *([1] * (x_t.dim() - 1)))
        mean = condition["mean"].to(x_t.device, x_t.dtype)
        s2 = float(self.config.noise_std) ** 2
        return (1 - abar).sqrt() * (x_t - abar.sqrt() * mean) / (abar * s2 + 1 - abar)
