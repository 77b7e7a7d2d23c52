"""The plugin contract (distill3d.plugins.contract) run over every registered plugin.

Small settings keep it fast; priors that need weights use the tiny random-weight models of
tests/tiny_models.py. A plugin registered later (by another package) is picked up here too: give
it small settings below or as its class attribute `contract_settings`.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from distill3d.plugins.contract import ContractError, check_guidance, check_representation, contract_cases
from tiny_models import build_tiny_if, build_tiny_sd
from tiny_zero123 import build_tiny_zero123

TINY_SD, TINY_IF, TINY_Z123 = "<tiny-sd>", "<tiny-if>", "<tiny-zero123>"
TINY_MESH = "<tiny-mesh>"  # a small coloured sphere written as an OBJ (no UVs: unwrapped and baked)
TINY_FIELD = {"levels": 4, "log2_table_size": 10, "max_resolution": 32, "hidden_dim": 16}
SETTINGS = {
    "representation:nerf": {**TINY_FIELD, "samples_per_ray": 16, "occupancy": {"resolution": 16, "update_every": 2, "warmup_steps": 2}},
    "representation:dmtet": {**TINY_FIELD, "grid_resolution": 8},
    "guidance:sds": {"prior": {"name": "oracle", "image_size": 16}},
    "guidance:sds-perp-neg": {"prior": {"name": "stable-diffusion", "model": TINY_SD, "local_files_only": True}, "guidance_scale": 7.5},
    "guidance:reference": {"resolution": 16},
    "prior:oracle": {"image_size": 32},
    "prior:stable-diffusion": {"model": TINY_SD, "local_files_only": True},
    "prior:deepfloyd-if": {"model": TINY_IF, "local_files_only": True},
    "representation:gaussians": {"num_points": 300, "densify": {"start": 1, "interval": 2, "stop": 8}},
    "prior:biased-oracle": {"image_size": 32},
    "prior:oracle-zero123": {"image_size": 32},
    "prior:zero123": {"model": TINY_Z123, "local_files_only": True, "image_size": 32},
    "representation:textured-mesh": {"mesh": TINY_MESH, "texture_size": 32},
    "guidance:refine": {"prior": {"name": "oracle", "image_size": 16}, "guidance_scale": 1.0, "ddim_steps": 10},
}


def _reference_view():
    """The default scene rendered from the reference camera: the input view-conditioned priors need."""
    from distill3d.engine.reference_scene import DEFAULT_SCENE
    from distill3d.engine.reference_view import ReferenceView, ReferenceViewConfig, reference_camera
    from distill3d.engine.references import load_reference

    camera = reference_camera(ReferenceViewConfig(size=32))
    ref = load_reference(DEFAULT_SCENE).render(camera, 32, 32, background=torch.zeros(1, 32, 32, 3))
    alpha = ref.opacity[0]
    rgb = torch.where(alpha > 0, ref.rgb[0] / alpha.clamp_min(1e-6), ref.rgb[0])
    return ReferenceView(rgba=torch.cat([rgb, alpha], -1).clamp(0, 1), camera=camera)


CTX = {"prior:oracle-zero123": {"reference_view": _reference_view()}, "prior:zero123": {"reference_view": _reference_view()}}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    return {TINY_SD: str(build_tiny_sd(root / "sd")), TINY_IF: str(build_tiny_if(root / "if")),
            TINY_Z123: str(build_tiny_zero123(root / "zero123"))}


@pytest.fixture(scope="module")
def tiny_mesh(tmp_path_factory) -> dict[str, str]:
    import trimesh

    path = tmp_path_factory.mktemp("mesh") / "sphere.obj"
    trimesh.creation.icosphere(subdivisions=2, radius=0.5).export(path)
    return {TINY_MESH: str(path)}


def fill(value, models):
    if isinstance(value, dict):
        return {k: fill(v, models) for k, v in value.items()}
    return models.get(value, value) if isinstance(value, str) else value


@pytest.mark.parametrize("case", contract_cases(SETTINGS, CTX), ids=str)
def test_registered_plugin_meets_the_contract(case, tmp_path, request):
    case = copy.deepcopy(case)
    if any(marker in repr(case.settings) for marker in (TINY_SD, TINY_IF, TINY_Z123)):  # build the tiny models only when asked
        case.settings = fill(case.settings, request.getfixturevalue("tiny_models"))
    if TINY_MESH in repr(case.settings):
        case.settings = fill(case.settings, request.getfixturevalue("tiny_mesh"))
    case.run(tmp_path)


def test_every_kind_is_covered():
    kinds = {c.kind for c in contract_cases(SETTINGS)}
    assert kinds == {"representation", "guidance", "prior"}


# --- the checks can fail: broken plugins are caught, each with the plugin and the check named ---


def test_a_parameter_outside_param_groups_is_caught(tmp_path, monkeypatch):
    from distill3d.representations.nerf.model import HashGridNeRF

    original = HashGridNeRF.param_groups
    monkeypatch.setattr(HashGridNeRF, "param_groups", lambda self: original(self)[1:])
    with pytest.raises(ContractError, match=r"representation 'nerf', param_groups: .* in no group"):
        check_representation("nerf", SETTINGS["representation:nerf"], tmp_path, resume=False)


def test_state_outside_the_checkpoint_is_caught(tmp_path, monkeypatch):
    from distill3d.representations.nerf.model import HashGridNeRF

    original = HashGridNeRF.render
    def render(self, cameras, settings):  # hidden state outside state_dict: how often it rendered
        self._renders = getattr(self, "_renders", 0) + 1
        out = original(self, cameras, settings)
        out.rgb = out.rgb / self._renders
        return out

    monkeypatch.setattr(HashGridNeRF, "render", render)
    with pytest.raises(ContractError, match="renders differently"):
        check_representation("nerf", SETTINGS["representation:nerf"], tmp_path, resume=False)


def test_a_guidance_without_gradient_is_caught(tmp_path, monkeypatch):
    from distill3d.guidance.reference import ReferenceViewGuidance

    original = ReferenceViewGuidance.forward
    monkeypatch.setattr(ReferenceViewGuidance, "forward", lambda self, out, cams, step: {k: v.detach() for k, v in original(self, out, cams, step).items()})
    with pytest.raises(ContractError, match="guidance 'reference', gradients"):
        check_guidance("reference", SETTINGS["guidance:reference"], tmp_path)


RESIZABLE = '''
from dataclasses import dataclass
import torch
from torch import nn
from distill3d.engine.interfaces import Representation, RenderOutput

@dataclass
class Cfg:
    points: int = 5

class Points(Representation):
    """A toy representation whose parameter count changes (as Gaussians do when densified)."""
    Config = Cfg

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.colors = nn.Parameter(torch.randn(config.points, 3))

    def resizable_parameters(self):  # the base class re-creates them with the stored shapes
        return ["colors"]

    def render(self, cameras, settings):
        b, h, w = len(cameras), settings.height, settings.width
        rgb = torch.sigmoid(self.colors).mean(0).expand(b, h, w, 3)
        one = torch.ones(b, h, w, 1)
        return RenderOutput(rgb=rgb, opacity=one * 0.5, depth=one * 3, background=torch.ones(b, h, w, 3))

class FixedPoints(Points):
    """Overrides load_state_dict and so loses the base class's resizing: cannot load another row count."""
    def load_state_dict(self, state, strict=True, assign=False):
        return nn.Module.load_state_dict(self, state, strict)
'''


def test_changed_parameter_counts_round_trip_or_are_caught(tmp_path, monkeypatch):
    import importlib

    (tmp_path / "toy_points.py").write_text(RESIZABLE)
    info = tmp_path / "toy_points-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-points\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[distill3d.representations]\npoints = toy_points:Points\nfixed-points = toy_points:FixedPoints\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    check_representation("points", {}, tmp_path, resume=False)  # a regrown state (6 rows) loads into a fresh 5-row one
    with pytest.raises(ContractError, match=r"(?s)representation .fixed-points., checkpoint round trip: RuntimeError: .*size mismatch for colors"):
        check_representation("fixed-points", {}, tmp_path, resume=False)
