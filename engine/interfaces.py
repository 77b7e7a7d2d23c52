"""The three plugin protocols the engine sees: Representation, Prior and Guidance.

The engine knows nothing about any one of them beyond what is written here. Every plugin class
carries a `Config` dataclass; the recipe selects the class by registry name and fills the config.

Capabilities are class attributes the engine checks when a recipe is resolved, before any work:
what a representation can export (`exports`), what a finished run of it can seed another with
(`provides`), what it can be seeded from (`accepts_init`). Capability names:
  "density_field"  density(points), albedo(points), surface_threshold, bounds()
  "surface_mesh"   export_mesh(...) gives a surface with colours
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from distill3d.engine.cameras import Cameras

if TYPE_CHECKING:
    from distill3d.engine.optim import OptimizerHooks
    from distill3d.engine.reference_view import ReferenceView

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
    # The ground truth (analytic scene or mesh file) for oracle priors and evaluation.
    scene: Path | None = None
    # The image-to-3D input: the preprocessed reference image and its camera.
    reference_view: "ReferenceView | None" = None
    # Mixed precision: dtype that heavy networks (priors) may run in.
    half_precision: bool = False
    # Priors declared at the recipe's top level (name -> plugin spec), and every prior built so
    # far (shared: one Stable Diffusion serves every guidance that names it). See build_prior.
    prior_specs: dict[str, Any] = field(default_factory=dict)
    priors: dict[str, "Prior"] = field(default_factory=dict)


def build_prior(ctx: BuildContext, spec: Any, path: str) -> "Prior":
    """The prior a guidance asks for: a name declared under the recipe's `priors:` (built once and
    shared by every guidance naming it) or an inline plugin mapping (built once for its path)."""
    from distill3d.engine.config import ConfigError
    from distill3d.plugins.registry import build_plugin

    if isinstance(spec, str):
        if spec not in ctx.prior_specs:
            known = ", ".join(sorted(ctx.prior_specs)) or "none declared"
            raise ConfigError(f"{path}: no prior named {spec!r} under the recipe's priors: ({known})")
        key, spec_path, spec = spec, f"priors.{spec}", ctx.prior_specs[spec]
    else:
        key, spec_path = path, path
    if key not in ctx.priors:
        ctx.priors[key] = build_plugin("prior", spec, ctx, spec_path)
    return ctx.priors[key]


@dataclass
class RenderSettings:
    height: int
    width: int
    shading: str = "albedo"  # albedo | lambertian | textureless | normal
    background: str | None = None  # None: the representation's own background setting
    need_normals: bool = False
    training: bool = True


class Representation(nn.Module):
    """A 3D representation: owns its parameters, their optimisation groups and its renderer choice."""

    Config: ClassVar[type]
    # Formats export() can write (checked against trainer.export and `distill3d export`).
    exports: ClassVar[tuple[str, ...]] = ()
    # What a finished run of it can seed another representation with, and what it accepts.
    provides: ClassVar[tuple[str, ...]] = ()
    accepts_init: ClassVar[tuple[str, ...]] = ()

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
        """Named optimizer groups: {"name", "params", "lr": number or schedule, **adam options}.
        The trainer evaluates each lr schedule every step (see engine/optim.py)."""
        return [{"name": "all", "params": [p for p in self.parameters() if p.requires_grad], "lr": 1e-3}]

    def resizable_parameters(self) -> list[str]:
        """Names of parameters whose row count changes during training (Gaussians). Loading a
        checkpoint re-creates them with the stored shapes first, so such runs resume and export."""
        return []

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        for name in self.resizable_parameters():
            if name in state_dict:
                module, _, leaf = name.rpartition(".")
                owner = self.get_submodule(module) if module else self
                current = getattr(owner, leaf)
                stored = state_dict[name]
                if tuple(current.shape) != tuple(stored.shape):
                    setattr(owner, leaf, nn.Parameter(current.new_empty(stored.shape), requires_grad=current.requires_grad))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def update(self, step: int) -> None:
        """Per-step hook before rendering (occupancy grids, progressive encodings)."""

    def after_backward(self, step: int, out: RenderOutput, hooks: "OptimizerHooks") -> None:
        """After backward, before the optimizer step. Parameter gradients are unscaled already;
        non-leaf tensors retained in `out` must be divided by hooks.grad_scale."""

    def after_step(self, step: int, hooks: "OptimizerHooks") -> None:
        """After the optimizer step: densify, prune or reset parameters through `hooks`."""

    def stats(self) -> dict[str, float]:
        """Numbers to log each step (e.g. a NeRF's occupied fraction, a Gaussian count)."""
        return {}

    def initialize_from(self, source: "Representation") -> dict:
        """Seed this representation from a finished one (coarse-to-fine, e.g. DMTet from a NeRF).
        Only called when one of `accepts_init` is in the source's `provides`. Returns what was
        done, for the log."""
        from distill3d.engine.errors import UserError

        raise UserError(f"{type(self).__name__} cannot be initialised from a {type(source).__name__} run")

    def export_mesh(self, resolution: int = 128, target_faces: int | None = None, texture_size: int = 1024):
        """A textured surface mesh: (distill3d.representations.mesh.mesh_io.Mesh, ExportInfo)."""
        raise NotImplementedError(f"{type(self).__name__} does not export meshes")

    def export(self, fmt: str, path: Path, options: "ExportOptions") -> list[Path]:
        """Write the run's asset in `fmt` (one of `exports`); returns the files written. Default:
        a textured mesh through export_mesh. Representations with other outputs override it."""
        from distill3d.representations.mesh.mesh_io import save_mesh

        mesh, info = self.export_mesh(options.resolution, options.decimate, options.texture_size)
        options.report(
            f"{info.faces_final} faces (surface extraction {info.faces_marching_cubes}, threshold {info.threshold:.3g}), "
            f"texture {info.texture_size}^2"
        )
        return save_mesh(mesh, path)

    def extra_state(self) -> dict:
        """Non-tensor state to checkpoint beyond state_dict()."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


@dataclass
class ExportOptions:
    resolution: int = 128  # surface extraction grid
    decimate: int | None = None  # target face count
    texture_size: int = 1024
    quiet: bool = False

    def report(self, text: str) -> None:
        if not self.quiet:
            import sys

            print(text, file=sys.stderr, flush=True)


def _drop_frozen_state(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix) :].split(".", 1)[0] in module.FROZEN]:
        del state_dict[key]


def _ignore_missing_frozen(module, incompatible_keys):
    prefixes = tuple(f"{net}." for net in module.FROZEN)
    missing = incompatible_keys.missing_keys
    for key in list(missing):
        parts = key.split(".")
        if any(".".join(parts[i:]).startswith(prefixes) for i in range(len(parts))):
            missing.remove(key)


class Prior(nn.Module):
    """A frozen model that predicts noise: Stable Diffusion, DeepFloyd IF, Zero123, the oracle.

    Works in its own space (latents or pixels). Subclasses set `alphas_cumprod` (T,) and
    implement the methods below. predict_noise never builds a graph.

    FROZEN names the submodules holding pretrained weights: they move with the prior (.to) but
    stay out of its state_dict, so run checkpoints hold no copy of a model (it is reloaded from
    the model on resume). A prior with trainable adapters (a LoRA) returns them from
    param_groups(); those do enter checkpoints.
    """

    Config: ClassVar[type]
    num_train_timesteps: int = 1000
    FROZEN: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any, ctx: BuildContext):
        super().__init__()
        self.config = config
        self.ctx = ctx
        if self.FROZEN:
            register = getattr(self, "register_state_dict_post_hook", None) or self._register_state_dict_hook
            register(_drop_frozen_state)
            self.register_load_state_dict_post_hook(_ignore_missing_frozen)

    def param_groups(self) -> list[dict]:
        """Trainable adapters, as named optimizer groups (see Representation.param_groups)."""
        return []

    def encode_images(self, rgb: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> the prior's space, differentiable."""
        raise NotImplementedError

    def decode_latents(self, latents: Tensor) -> Tensor:
        """The prior's space -> (B, 3, h, w) images in [0, 1], without a graph (what the refine
        guidance compares renders with). Priors that cannot decode leave this unimplemented."""
        raise NotImplementedError(f"prior {type(self).__name__} cannot decode its space into images")

    def encode_render(self, out: RenderOutput) -> Tensor:
        """A render -> the prior's space, differentiable. Default: its RGB through encode_images;
        priors that want more channels (rgb_as_latents) override this."""
        return self.encode_images(out.rgb_bchw())

    def conditions(self, cameras: Cameras, out: RenderOutput) -> tuple[Condition, Condition]:
        """(conditional, unconditional) conditions for this batch of views."""
        raise NotImplementedError

    def predict_noise(self, x_t: Tensor, t: Tensor, condition: Condition, is_conditional: Tensor | None = None) -> Tensor:
        """Noise prediction eps_hat for noisy inputs x_t at integer timesteps t (B,).
        is_conditional (B,) bool, when given, marks the rows that carry the conditional branch
        (priors with class-conditioned adapters, e.g. VSD's LoRA, need it)."""
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

    def param_groups(self) -> list[dict]:
        """Trainable parts of the guidance as named optimizer groups (default: none)."""
        return []

    def views(self, step: int) -> tuple[Cameras, RenderSettings] | None:
        """Cameras this guidance needs rendered for itself (e.g. the reference view), or None to
        use the shared random views of the step."""
        return None

    def forward(self, out: RenderOutput, cameras: Cameras, step: int) -> dict[str, Tensor]:
        """Weighted loss terms by name."""
        raise NotImplementedError
