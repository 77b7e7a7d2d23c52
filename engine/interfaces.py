"""The three plugin protocols the engine sees: Representation, Prior and Guidance.

The engine knows nothing about any one of them beyond what is written here. Every plugin class
carries a `Config` dataclass; the recipe selects the class by registry name and fills the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from distill3d.engine.cameras import Cameras

Condition = dict[str, Tensor]
"""A prior's condition: named tensors whose first dimension is the batch."""


def cat_conditions(*conditions: Condition) -> Condition:
    """Stack conditions along the batch so one network call serves them all (CFG, Perp-Neg)."""
    keys = conditions[0].keys()
    return {k: torch.cat([c[k] for c in conditions], dim=0) for k in keys}


@dataclass
class RenderOutput:
    """What every renderer returns. Images are channels-last (B, H, W, C), colours in [0, 1]."""

    rgb: Tensor  # (B, H, W, 3), composited over `background`
    opacity: Tensor  # (B, H, W, 1)
    depth: Tensor  # (B, H, W, 1), expected ray distance of the surface (0 where empty)
    background: Tensor  # (B, H, W, 3), what was composited under rgb
    normal: Tensor | None = None  # (B, H, W, 3) world-space, in [-1, 1], when asked for
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.rgb.shape[0]

    def rgb_bchw(self) -> Tensor:
        return self.rgb.permute(0, 3, 1, 2)


@dataclass
class BuildContext:
    """What every plugin may need at construction, beyond its own config."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    total_steps: int = 1000
    prompt: str = ""
    negative_prompt: str = ""
    run_dir: Path | None = None
    cache_dir: Path | None = None
    # Path of a reference (scene JSON/YAML, mesh or image) for the oracle or image-to-3D.
    reference: Path | None = None
    # Mixed precision: dtype that heavy networks (priors) may run in.
    half_precision: bool = False


@dataclass
class RenderSettings:
    height: int
    width: int
    shading: str = "albedo"  # albedo | lambertian | textureless | normal
    background: str | None = None  # None: the representation's own background setting
    need_normals: bool = False
    training: bool = True


class Representation(nn.Module):
    """A 3D representation: owns its parameters and its renderer choice."""

    Config: ClassVar[type]

    def __init__(self, config: Any, ctx: BuildContext):
        super().__init__()
        self.config = config
        self.ctx = ctx

    def render(self, cameras: Cameras, settings: RenderSettings) -> RenderOutput:
        raise NotImplementedError

    def regularizers(self, out: RenderOutput, step: int) -> dict[str, Tensor]:
        """Weighted regulariser terms added to the loss (names are logged)."""
        return {}

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups (each with its own lr)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def update(self, step: int) -> None:
        """Per-step hook before rendering (occupancy grids, progressive encodings)."""

    def after_backward(self, step: int, out: RenderOutput, optimizer: torch.optim.Optimizer) -> None:
        """Hook after backward, before the optimizer step (densification of Gaussians)."""

    def initialize_from(self, source: "Representation") -> dict:
        """Seed this representation from a finished one (coarse-to-fine, e.g. DMTet from a NeRF).
        Returns what was done, for the log."""
        from distill3d.engine.errors import UserError

        raise UserError(f"{type(self).__name__} cannot be initialised from a {type(source).__name__} run")

    def export_mesh(self, resolution: int = 128, target_faces: int | None = None, texture_size: int = 1024):
        """A textured surface mesh: (distill3d.representations.mesh.mesh_io.Mesh, ExportInfo)."""
        raise NotImplementedError(f"{type(self).__name__} does not export meshes")

    def extra_state(self) -> dict:
        """Non-tensor state to checkpoint beyond state_dict()."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class Prior(nn.Module):
    """A frozen model that predicts noise: Stable Diffusion, DeepFloyd IF, Zero123, the oracle.

    Works in its own space (latents or pixels). Subclasses set `alphas_cumprod` (T,) and
    implement the three methods below. predict_noise never builds a graph.
    """

    Config: ClassVar[type]
    num_train_timesteps: int = 1000

    def __init__(self, config: Any, ctx: BuildContext):
        super().__init__()
        self.config = config
        self.ctx = ctx

    def encode_images(self, rgb: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> the prior's space, differentiable."""
        raise NotImplementedError

    def encode_render(self, out: RenderOutput) -> Tensor:
        """A render -> the prior's space, differentiable. Default: its RGB through encode_images;
        priors that want more channels (rgb_as_latents) override this."""
        return self.encode_images(out.rgb_bchw())

    def conditions(self, cameras: Cameras, out: RenderOutput) -> tuple[Condition, Condition]:
        """(conditional, unconditional) conditions for this batch of views."""
        raise NotImplementedError

    def predict_noise(self, x_t: Tensor, t: Tensor, condition: Condition) -> Tensor:
        """Noise prediction eps_hat for noisy inputs x_t at integer timesteps t (B,)."""
        raise NotImplementedError

    def add_noise(self, x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        abar = self.alphas_cumprod.to(x.device)[t].view(-1, *([1] * (x.dim() - 1)))
        return abar.sqrt() * x + (1 - abar).sqrt() * noise


class Guidance(nn.Module):
    """Turns renders into loss terms, usually through a prior."""

    Config: ClassVar[type]

    def __init__(self, config: Any, ctx: BuildContext):
        super().__init__()
        self.config = config
        self.ctx = ctx

    def active(self, step: int) -> bool:
        """Whether this guidance contributes at this step (e.g. a reference loss every N steps)."""
        return True

    def views(self, step: int) -> tuple[Cameras, RenderSettings] | None:
        """Cameras this guidance needs rendered for itself (e.g. the reference view), or None to
        use the shared random views of the step."""
        return None

    def forward(self, out: RenderOutput, cameras: Cameras, step: int) -> dict[str, Tensor]:
        """Weighted loss terms by name."""
        raise NotImplementedError
