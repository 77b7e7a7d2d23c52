"""The plugin contract as runnable checks: run them on every registered plugin, or on your own.

Each check builds the plugin by its registered name (through the same registry and config
checking a recipe uses) with small settings, and raises ContractError saying what broke:

  check_representation(name, settings)  render shapes and ranges, gradients reach the parameters,
      param_groups cover every trainable parameter once, a state_dict round trip through
      torch.load(weights_only=True) renders identically (resizable parameters regrown to other
      row counts too), and a short oracle run resumed from a mid-run checkpoint ends bit-identical.
  check_guidance(name, settings)   finite scalar loss terms whose gradient reaches the render;
      its state (if any) round-trips.
  check_prior(name, settings)      alphas_cumprod, differentiable encoding, conditions with one
      row per view, predict_noise shape without a graph; its state round-trips.

For pytest, parametrise over `contract_cases(settings)`: every registered plugin, each with the
settings given for it (defaults otherwise). A plugin may carry its own small test settings as a
class attribute `contract_settings: dict` (e.g. a small table size); `settings` wins over it.

    # tests/test_my_plugin.py in a plugin package
    import pytest
    from distill3d.plugins.contract import contract_cases

    @pytest.mark.parametrize("case", contract_cases(only=["my-representation"]), ids=str)
    def test_contract(case, tmp_path):
        case.run(tmp_path)
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from distill3d.engine.cameras import make_cameras
from distill3d.engine.errors import UserError
from distill3d.engine.interfaces import BuildContext, RenderOutput, RenderSettings, cat_conditions
from distill3d.plugins.registry import GROUPS, Registry, build_plugin


class ContractError(AssertionError):
    """A plugin that breaks the engine's contract (the message names the plugin and the check)."""


def _fail(kind: str, name: str, check: str, detail: str) -> None:
    raise ContractError(f"{kind} {name!r}, {check}: {detail}")


def _context(tmp: Path | None = None, **overrides) -> BuildContext:
    from distill3d.engine.reference_scene import DEFAULT_SCENE

    values = dict(device=torch.device("cpu"), seed=0, total_steps=8, prompt="a photo of a cat",
                  negative_prompt="", run_dir=tmp, cache_dir=(tmp / "cache") if tmp else None, scene=DEFAULT_SCENE)
    values.update(overrides)
    return BuildContext(**values)


def _cameras(batch: int = 2):
    return make_cameras(torch.tensor([15.0, -5.0][:batch]), torch.tensor([0.0, 120.0][:batch]),
                        torch.full((batch,), 3.2), torch.full((batch,), 40.0))


def _roundtrip(state: dict) -> dict:
    """What a checkpoint gives back: saved, then loaded as tensors and plain data only."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _spec(name: str, settings: dict | None) -> dict:
    return {"name": name, **copy.deepcopy(settings or {})}


# ----- representations --------------------------------------------------------------------------


def _check_render(name: str, out: Any, batch: int, size: int) -> None:
    if not isinstance(out, RenderOutput):
        _fail("representation", name, "render", f"returned {type(out).__name__}, not a RenderOutput")
    for key, channels in (("rgb", 3), ("opacity", 1), ("depth", 1), ("background", 3)):
        value = getattr(out, key)
        want = (batch, size, size, channels)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != want:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            _fail("representation", name, "render", f"{key} has shape {got}, expected {want} (B, H, W, C)")
        if not torch.isfinite(value).all():
            _fail("representation", name, "render", f"{key} has NaN or inf values")
    for key in ("rgb", "opacity"):
        value = getattr(out, key)
        if value.min() < -1e-4 or value.max() > 1 + 1e-4:
            _fail("representation", name, "render", f"{key} leaves [0, 1] ({value.min():.3g}..{value.max():.3g})")


def _grow_resizable(representation, state: dict) -> dict:
    """A state whose resizable parameters have one row more (row 0 repeated), as after densifying."""
    grown = dict(state)
    for key in representation.resizable_parameters():
        if key in grown:
            grown[key] = torch.cat([grown[key], grown[key][:1]])
    return grown


def _seeded_render(rep, cams, settings) -> RenderOutput:
    """A render with the RNG fixed (random backgrounds, light jitter draw the same numbers)."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(2)
        return rep.render(cams, settings)


def _load_fresh(name: str, spec: dict, tmp: Path | None, checkpoint: dict):
    """A new instance (another seed) loaded from `checkpoint` after a weights_only round trip;
    its parameter shapes must be the stored ones."""
    torch.manual_seed(1)
    fresh = build_plugin("representation", spec, _context(tmp), "representation").eval()
    saved = _roundtrip(checkpoint)
    try:
        fresh.load_state_dict(saved["state"])
        fresh.load_extra_state(saved["extra"])
    except Exception as exc:  # noqa: BLE001 - any failure to load is the finding
        _fail("representation", name, "checkpoint round trip", f"{type(exc).__name__}: {exc}")
    stored = {k: tuple(v.shape) for k, v in saved["state"].items()}
    now = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    if stored != now:
        changed = [k for k in stored if stored[k] != now.get(k)]
        _fail("representation", name, "checkpoint round trip", f"parameter shapes not restored: {changed[:5]}")
    return fresh


def check_representation(name: str, settings: dict | None = None, tmp: Path | None = None, size: int = 16,
                         resume: bool = True) -> None:
    """Run every representation check (see the module docstring)."""
    kind = "representation"
    spec = _spec(name, settings)
    torch.manual_seed(0)
    rep = build_plugin(kind, spec, _context(tmp), kind)
    cams = _cameras(2)

    # Shapes and gradients.
    rep.train()
    out = rep.render(cams, RenderSettings(size, size, training=True))
    _check_render(name, out, 2, size)
    loss = out.rgb.mean() + out.opacity.mean() + sum(rep.regularizers(out, 0).values(), torch.zeros(()))
    loss.backward()
    groups = rep.param_groups()
    grouped = [p for g in groups for p in g["params"]]
    trainable = [p for p in rep.parameters() if p.requires_grad]
    if len({id(p) for p in grouped}) != len(grouped):
        _fail(kind, name, "param_groups", "a parameter is in more than one group")
    missing = {id(p) for p in trainable} - {id(p) for p in grouped}
    if missing:
        _fail(kind, name, "param_groups", f"{len(missing)} trainable parameter(s) are in no group (they would never train)")
    grads = [p.grad for p in grouped if p.grad is not None]
    if not grads or all(float(g.abs().sum()) == 0 for g in grads):
        _fail(kind, name, "gradients", "rendering gives no gradient to any parameter")
    if not all(torch.isfinite(g).all() for g in grads):
        _fail(kind, name, "gradients", "a parameter gradient has NaN or inf values")

    # Checkpoint round trip into a fresh instance (built with another seed): it renders the same.
    rep.eval()
    fresh = _load_fresh(name, spec, tmp, {"state": rep.state_dict(), "extra": rep.extra_state()})
    a, b = (_seeded_render(r, cams, RenderSettings(size, size, training=False)) for r in (rep, fresh))
    if not (torch.equal(a.rgb, b.rgb) and torch.equal(a.opacity, b.opacity)):
        _fail(kind, name, "checkpoint round trip", "a reloaded copy renders differently "
              f"(max rgb difference {float((a.rgb - b.rgb).abs().max()):.3g}): is some state outside state_dict/extra_state?")
    # Changed parameter counts: resizable parameters one row longer load into a default-sized instance.
    if rep.resizable_parameters():
        _load_fresh(name, spec, tmp, {"state": _grow_resizable(rep, rep.state_dict()), "extra": rep.extra_state()})

    if resume:
        if tmp is None:
            raise ValueError("check_representation(resume=True) needs a tmp directory")
        check_resume(name, settings, tmp)


def check_resume(name: str, settings: dict | None, tmp: Path, steps: int = 4) -> None:
    """A short oracle run; resumed from its mid-run checkpoint it must end bit-identical."""
    from distill3d.engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
    from distill3d.engine.recipe import load_recipe_data, resolve_recipe
    from distill3d.engine.trainer import Trainer

    kind = "representation"
    half = steps // 2
    data = load_recipe_data("oracle-nerf", [
        f"trainer.steps={steps}", f"trainer.checkpoint_every={half}", "trainer.keep_checkpoints=10",
        "trainer.resolution=16", "trainer.eval_views=1", "trainer.eval_resolution=16", "trainer.video_frames=2",
        "trainer.video_resolution=16", "trainer.export=[]", "trainer.log_every=1", "guidance.0.prior.image_size=16",
    ])
    data["representation"] = _spec(name, settings)
    recipe = resolve_recipe(data)
    run = Path(tmp) / f"contract-{name}"
    Trainer.create(recipe, run, quiet=True).fit()
    final = latest_checkpoint(run / "checkpoints")
    expected = load_checkpoint(final)["representation"]
    mid = [p for p in list_checkpoints(run / "checkpoints") if p != final]
    if not mid:
        _fail(kind, name, "resume", "no mid-run checkpoint was written")
    final.unlink()
    Trainer.resume(run, quiet=True).fit()
    got = load_checkpoint(latest_checkpoint(run / "checkpoints"))["representation"]
    if got.keys() != expected.keys():
        _fail(kind, name, "resume", "the resumed run's state has other keys")
    diff = [k for k in expected if not torch.equal(expected[k], got[k])]
    if diff:
        _fail(kind, name, "resume", f"resumed from step {half}, the state differs from an uninterrupted run in {diff[:5]}")


# ----- guidance ---------------------------------------------------------------------------------


def check_guidance(name: str, settings: dict | None = None, tmp: Path | None = None, size: int = 16, **ctx) -> None:
    """Loss terms from a differentiable stand-in render; gradients reach the render."""
    kind = "guidance"
    torch.manual_seed(0)
    guidance = build_plugin(kind, _spec(name, settings), _context(tmp, **ctx), "guidance.0")
    step = 0
    request = guidance.views(step)
    cams = _cameras(2) if request is None else request[0]
    h, w = (size, size) if request is None else (request[1].height, request[1].width)
    b = len(cams.azimuth)
    logits = torch.zeros(b, h, w, 3, requires_grad=True)
    alpha_logits = torch.zeros(b, h, w, 1, requires_grad=True)
    with torch.no_grad():
        logits.add_(torch.randn_like(logits))
        alpha_logits.add_(torch.randn_like(alpha_logits))
    background = torch.ones(b, h, w, 3)
    opacity = torch.sigmoid(alpha_logits)
    out = RenderOutput(rgb=torch.sigmoid(logits) * opacity + background * (1 - opacity), opacity=opacity,
                       depth=torch.full((b, h, w, 1), 3.0) * opacity, background=background,
                       normal=torch.nn.functional.normalize(torch.randn(b, h, w, 3), dim=-1))
    terms = guidance(out, cams, step)
    if not isinstance(terms, dict) or not terms:
        _fail(kind, name, "forward", f"returned {type(terms).__name__}, expected a non-empty dict of named loss terms")
    for key, value in terms.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            _fail(kind, name, "forward", f"term {key!r} is not a scalar tensor")
        if not torch.isfinite(value):
            _fail(kind, name, "forward", f"term {key!r} is {float(value)}")
    total = sum(terms.values())
    if total.requires_grad:
        total.backward()
    grads = [g for g in (logits.grad, alpha_logits.grad) if g is not None]
    if not grads or all(float(g.abs().sum()) == 0 for g in grads):
        _fail(kind, name, "gradients", "no loss term gives a gradient to the render")
    if not all(torch.isfinite(g).all() for g in grads):
        _fail(kind, name, "gradients", "the render's gradient has NaN or inf values")
    fresh = build_plugin(kind, _spec(name, settings), _context(tmp, **ctx), "guidance.0")
    try:
        fresh.load_state_dict(_roundtrip(guidance.state_dict()))
    except Exception as exc:  # noqa: BLE001
        _fail(kind, name, "checkpoint round trip", f"{type(exc).__name__}: {exc}")


# ----- priors -----------------------------------------------------------------------------------


def check_prior(name: str, settings: dict | None = None, tmp: Path | None = None, size: int = 32, **ctx) -> None:
    """alphas_cumprod, encoding with gradient, conditions per view, predict_noise without a graph."""
    kind = "prior"
    torch.manual_seed(0)
    prior = build_plugin(kind, _spec(name, settings), _context(tmp, **ctx), "guidance.0.prior")
    abar = getattr(prior, "alphas_cumprod", None)
    if not isinstance(abar, torch.Tensor) or abar.dim() != 1 or len(abar) != prior.num_train_timesteps:
        _fail(kind, name, "alphas_cumprod", f"expected a (num_train_timesteps,) = ({prior.num_train_timesteps},) tensor")
    if not ((abar > 0).all() and (abar <= 1).all() and (abar[1:] <= abar[:-1]).all()):
        _fail(kind, name, "alphas_cumprod", "must lie in (0, 1] and not increase with t")
    b = 2
    cams = _cameras(b)
    logits = torch.randn(b, size, size, 3, requires_grad=True)
    rgb = torch.sigmoid(logits)
    out = RenderOutput(rgb=rgb, opacity=torch.ones(b, size, size, 1), depth=torch.full((b, size, size, 1), 3.0),
                       background=torch.ones(b, size, size, 3))
    latents = prior.encode_render(out)
    if not isinstance(latents, torch.Tensor) or latents.shape[0] != b or not torch.isfinite(latents).all():
        _fail(kind, name, "encode_render", f"expected finite latents with batch {b}")
    latents.float().square().mean().backward()
    if logits.grad is None or float(logits.grad.abs().sum()) == 0:
        _fail(kind, name, "encode_render", "the encoding is not differentiable (no gradient reaches the render)")
    cond, uncond = prior.conditions(cams, out)
    if not isinstance(cond, dict) or set(cond) != set(uncond):
        _fail(kind, name, "conditions", "expected two dicts of tensors with the same keys")
    for key in cond:
        if cond[key].shape[0] != b or uncond[key].shape[0] != b:
            _fail(kind, name, "conditions", f"{key!r} must have one row per view ({b})")
    t = torch.full((2 * b,), prior.num_train_timesteps // 2, dtype=torch.long)
    x = latents.detach()
    x_t = prior.add_noise(torch.cat([x, x]), torch.randn_like(torch.cat([x, x])), t)
    eps = prior.predict_noise(x_t, t, cat_conditions(uncond, cond))
    if tuple(eps.shape) != tuple(x_t.shape):
        _fail(kind, name, "predict_noise", f"shape {tuple(eps.shape)}, expected {tuple(x_t.shape)}")
    if eps.requires_grad:
        _fail(kind, name, "predict_noise", "the prediction carries a graph (run the network under torch.no_grad)")
    if not torch.isfinite(eps).all():
        _fail(kind, name, "predict_noise", "NaN or inf in the prediction")
    fresh = build_plugin(kind, _spec(name, settings), _context(tmp, **ctx), "guidance.0.prior")
    try:
        fresh.load_state_dict(_roundtrip(prior.state_dict()))
    except Exception as exc:  # noqa: BLE001
        _fail(kind, name, "checkpoint round trip", f"{type(exc).__name__}: {exc}")


# ----- every registered plugin ------------------------------------------------------------------

CHECKS: dict[str, Callable[..., None]] = {"representation": check_representation, "guidance": check_guidance, "prior": check_prior}


@dataclass
class ContractCase:
    kind: str
    name: str
    settings: dict = field(default_factory=dict)
    ctx: dict = field(default_factory=dict)

    def run(self, tmp: Path) -> None:
        extra = self.ctx if self.kind != "representation" else {}
        CHECKS[self.kind](self.name, self.settings, Path(tmp), **extra)

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}"


def contract_cases(settings: dict[str, dict] | None = None, ctx: dict[str, dict] | None = None,
                   only: list[str] | None = None) -> list[ContractCase]:
    """One case per registered plugin. `settings` / `ctx` are keyed "kind:name" (or just "name");
    a plugin's own `contract_settings` class attribute fills in where neither gives any."""
    settings, ctx = settings or {}, ctx or {}
    cases = []
    for kind in GROUPS:
        registry = Registry(kind)
        for name in registry.names():
            if only is not None and name not in only:
                continue
            key = f"{kind}:{name}"
            given = settings.get(key, settings.get(name))
            if given is None:
                try:
                    given = dict(getattr(registry.get(name), "contract_settings", {}) or {})
                except UserError:
                    given = {}  # the case itself will report the load failure
            cases.append(ContractCase(kind, name, given, ctx.get(key, ctx.get(name, {}))))
    return cases
