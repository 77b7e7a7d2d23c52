"""Shading modes shared by the renderers (DreamFusion): albedo, Lambertian, textureless.

Lambertian and textureless use a point light near the camera: a random direction within a cone
around the camera position during training (so the geometry must explain the shading), the camera
direction itself otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

SHADING_MODES = ("albedo", "lambertian", "textureless", "normal")


@dataclass
class ShadingConfig:
    # Probabilities of each mode for training renders (DreamFusion uses a mix; the oracle albedo).
    train_mix: dict[str, float] = field(default_factory=lambda: {"albedo": 1.0})
    ambient: float = 0.1
    diffuse: float = 0.9
    light_jitter_deg: float = 45.0


def pick_training_mode(config: ShadingConfig) -> str:
    """Draw one shading mode for this training render from train_mix (uses the global RNG)."""
    names = list(config.train_mix)
    probs = torch.tensor([config.train_mix[n] for n in names], dtype=torch.float64)
    return names[int(torch.multinomial(probs / probs.sum(), 1).item())]


def validate_mix(mix: dict[str, float]) -> None:
    bad = [k for k in mix if k not in SHADING_MODES]
    if bad:
        raise ValueError(f"unknown shading mode {bad[0]!r} in train_mix; use {', '.join(SHADING_MODES)}")
    if not mix or sum(mix.values()) <= 0 or min(mix.values()) < 0:
        raise ValueError("shading train_mix needs non-negative probabilities with a positive sum")


def light_directions(camera_positions: Tensor, jitter_deg: float, training: bool) -> Tensor:
    """Unit directions toward the light (B, 3), near the camera direction."""
    d = torch.nn.functional.normalize(camera_positions, dim=-1)
    if training and jitter_deg > 0:
        d = torch.nn.functional.normalize(d + torch.randn_like(d) * torch.tan(torch.tensor(jitter_deg).deg2rad() / 2), dim=-1)
    return d


def render_shading(settings, config: ShadingConfig, camera_positions: Tensor) -> tuple[str, Tensor]:
    """The shading mode of this render ("train" draws one from train_mix when training, albedo
    otherwise) and the light directions (B, 3) for its cameras."""
    mode = settings.shading
    if mode == "train":
        mode = pick_training_mode(config) if settings.training else "albedo"
    return mode, light_directions(camera_positions, config.light_jitter_deg, settings.training)


def shading_extras(mode: str, light: Tensor, config: ShadingConfig) -> dict:
    """What a render records in RenderOutput.extras about its shading, so a pixel-space prior (the
    oracle) can shade its exact reference render the same way (shade_like_render)."""
    return {"shading": mode, "light": light, "shading_config": config}


def shade_like_render(extras: dict, albedo: Tensor, normals: Tensor | None) -> Tensor:
    """albedo (B, H, W, 3) shaded as the render whose extras are given (shading_extras): its mode,
    its lights (B, 3), its ambient/diffuse. Renders without a "shading" entry count as albedo."""
    mode = extras.get("shading", "albedo")
    if mode == "albedo":
        return albedo
    if "light" not in extras:
        raise ValueError(
            f"the render is shaded {mode!r} but its extras carry no 'light': a representation that shades "
            "must record representations.shading.shading_extras(mode, light, config) in RenderOutput.extras"
        )
    light = extras["light"].to(albedo).view(-1, *([1] * (albedo.dim() - 2)), 3)
    return shade(albedo, normals, light, mode, extras.get("shading_config") or ShadingConfig())


def shade(albedo: Tensor, normals: Tensor | None, light_dir: Tensor, mode: str, config: ShadingConfig) -> Tensor:
    """Colour per sample/pixel. albedo (..., 3); normals (..., 3) unit; light_dir broadcastable."""
    if mode == "albedo":
        return albedo
    if normals is None:
        raise ValueError(f"shading mode {mode!r} needs normals")
    if mode == "normal":
        return (normals + 1) / 2
    lambert = (normals * light_dir).sum(-1, keepdim=True).clamp_min(0)
    intensity = config.ambient + config.diffuse * lambert
    if mode == "lambertian":
        return albedo * intensity
    if mode == "textureless":
        return intensity.expand_as(albedo)
    raise ValueError(f"unknown shading mode {mode!r}; use {', '.join(SHADING_MODES)}")
