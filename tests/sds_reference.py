"""An independent, written-out SDS step for checking the guidance code on a real (tiny) prior.

The guidance under test draws its own timestep and noise; the tests record them (the prior's
`add_noise` sees both) and recompute everything else here from the formulas in
shared/reference/methods.md: x_t = sqrt(abar) x + sqrt(1 - abar) eps, classifier-free guidance
eps_u + s (eps_c - eps_u) (or Perp-Neg's combination), grad = w(t) (eps_hat - eps) with
w = 1 - abar, and the render gradient = weight * grad / B pushed back through the encoder.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


class NoiseRecorder:
    """Wraps prior.add_noise to record (clean latents, noise, t) of the guidance's SDS step."""

    def __init__(self, prior, monkeypatch):
        self.calls: list[dict[str, Tensor]] = []
        original = prior.add_noise

        def add_noise(x, noise, t):
            self.calls.append({"x": x.detach().clone(), "noise": noise.detach().clone(), "t": t.detach().clone()})
            return original(x, noise, t)

        monkeypatch.setattr(prior, "add_noise", add_noise)

    @property
    def last(self) -> dict[str, Tensor]:
        assert self.calls, "the guidance never noised its latents"
        return self.calls[-1]


def noised(prior, latents: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    abar = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    return abar.sqrt() * latents + (1 - abar).sqrt() * noise


def cfg(eps_u: Tensor, eps_c: Tensor, scale: float) -> Tensor:
    return eps_u + scale * (eps_c - eps_u)


def perp(a: Tensor, b: Tensor) -> Tensor:
    """a minus its projection on b, per sample (flattened over C, H, W)."""
    af, bf = a.flatten(1), b.flatten(1)
    coef = (af * bf).sum(1) / (bf * bf).sum(1).clamp_min(1e-6)
    return (af - coef[:, None] * bf).view_as(a)


def rows(condition: dict, index: list[int]) -> dict:
    return {k: v[index] for k, v in condition.items()}


def mixed(condition: dict, mix: list[list[float]]) -> dict:
    """Per camera, sum_d mix[d] * condition[d] for float entries (the dominant row otherwise)."""
    out = {}
    for k, v in condition.items():
        if v.is_floating_point():
            out[k] = torch.stack([sum(m[d] * v[d] for d in range(len(m)) if m[d]) for m in mix])
        else:
            out[k] = v[[max(range(len(m)), key=lambda d: m[d]) for m in mix]]
    return out


def perp_neg_rows_stable_dreamfusion(azimuth: float, negative_w: float = -2.0, front_decay: float = 2.0, side_decay: float = 10.0):
    """One camera's Perp-Neg plan written from methods.md (stable-dreamfusion weights, elevation
    below the overhead threshold): (positive mix over front/side/back/overhead, negative directions,
    negative weights)."""
    FRONT, SIDE, BACK = 0, 1, 2
    a = abs(azimuth)
    if a < 90:
        r = 1 - a / 90
        w_front = 0.0 if r > 0.8 else math.exp(-front_decay * r) * negative_w
        w_side = 0.0 if r < 0.2 else math.exp(-side_decay * (1 - r)) * negative_w
        return [r, 1 - r, 0.0, 0.0], [FRONT, SIDE], [w_front, w_side]
    r = 1 - (a - 90) / 90
    w_side = 0.0 if r > 0.8 else math.exp(-side_decay * r) * negative_w / 2
    return [0.0, r, 1 - r, 0.0], [SIDE, FRONT], [w_side, negative_w]


def render_gradient(encode: Callable[[Tensor], Tensor], rgb: Tensor, latent_grad: Tensor, weight: float) -> Tensor:
    """d(weight * 0.5 ||z - sg(z - g)||^2 / B) / d rgb = weight * J_encode^T g / B."""
    x = rgb.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(encode(x), x, grad_outputs=weight * latent_grad / rgb.shape[0])
    return g


def perp_neg_rows_threestudio(azimuth: float):
    """threestudio's weights from methods.md: f(a, b, c; r) = a exp(-b r) + c, weights -f, with
    (4, 0.5, -2.426) front/side, (1, 0.5, -0.606) side/back, (1, 0.5, 0.967) front-from-back."""
    FRONT, SIDE = 0, 1
    a = abs(azimuth)
    if a < 90:
        r = 1 - a / 90
        return [r, 1 - r, 0.0, 0.0], [FRONT, SIDE], [-(4 * math.exp(-0.5 * r) - 2.426), -(4 * math.exp(-0.5 * (1 - r)) - 2.426)]
    r = 2 - a / 90
    return [0.0, r, 1 - r, 0.0], [SIDE, FRONT], [-(math.exp(-0.5 * r) - 0.606), -(math.exp(-0.5 * r) + 0.967)]
