"""The math audit against methods.md, threestudio and stable-dreamfusion: timestep bounds, SDS
weightings as plugins, Perp-Neg needing view-dependent prompts, the dreamfusion recipes' settings
and the view buckets."""

from __future__ import annotations

import importlib

import pytest
import torch

from distill3d.engine.config import ConfigError, from_dict
from distill3d.engine.recipe import load_recipe
from distill3d.guidance.sds import SDSConfig
from distill3d.guidance.timesteps import TimestepConfig, available_weightings, get_weighting, sample_timesteps, sds_weight
from distill3d.guidance.view_prompts import BACK, FRONT, OVERHEAD, SIDE, view_directions

T = 1000


# --- t in [t_min, t_max], both ends reached ----------------------------------------------------


def test_fixed_range_reaches_both_bounds():
    torch.manual_seed(0)
    t = sample_timesteps(TimestepConfig(t_min=0.02, t_max=0.98, per_item=True), 40000, 0, 100, T)
    assert int(t.min()) == 20 and int(t.max()) == 980


@pytest.mark.parametrize("lo, hi, expected", [(0.5, 0.5, {500}), (0.29, 0.3, {290, 300}), (0.98, 0.99, {980, 990})])
def test_range_bounds_are_inclusive_and_exact(lo, hi, expected):
    torch.manual_seed(1)
    t = sample_timesteps(TimestepConfig(t_min=lo, t_max=hi, per_item=True), 5000, 0, 100, T)
    assert {int(t.min()), int(t.max())} == expected  # 0.29 * 1000 = 289.99...: still 290


def test_upper_bound_one_stays_a_valid_index():
    t = sample_timesteps(TimestepConfig(t_min=0.9, t_max=1.0, per_item=True), 2000, 0, 100, T)
    assert int(t.max()) == T - 1


# --- SDS weightings: a registry, the built-ins registered like a third party's ----------------


def test_builtin_weightings_register_through_entry_points():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="distill3d.weightings")}
    assert eps["sds"] == "distill3d.guidance.timesteps:sds_weighting"
    assert eps["uniform"] == "distill3d.guidance.timesteps:uniform_weighting"
    assert eps["fantasia3d"] == "distill3d.guidance.timesteps:fantasia3d_weighting"
    assert {"sds", "uniform", "fantasia3d"} <= set(available_weightings())


def snr_weighting(abar):
    """An author's weighting: w = abar / (1 - abar) (SNR), for the function-path test."""
    return abar / (1 - abar)


def test_a_weighting_by_function_path_and_by_third_party_entry_point(tmp_path, monkeypatch):
    abar = torch.tensor([0.25, 0.5])
    cfg = from_dict(SDSConfig, {"weighting": "test_math_audit:snr_weighting"}, "guidance.0")
    assert torch.allclose(sds_weight(cfg.weighting, abar), abar / (1 - abar))
    info = tmp_path / "my_weights-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-weights\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[distill3d.weightings]\nsnr = test_math_audit:snr_weighting\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert "snr" in available_weightings()
    cfg = from_dict(SDSConfig, {"weighting": "snr"}, "guidance.0")
    assert torch.allclose(sds_weight(cfg.weighting, abar), abar / (1 - abar))


def test_unknown_weighting_is_named_with_its_key_when_the_recipe_resolves():
    with pytest.raises(ConfigError, match=r"guidance\.0\.weighting: unknown SDS weighting 'sdss'; available: .*fantasia3d.*sds.*uniform"):
        load_recipe("oracle-nerf", ["guidance.0.weighting=sdss"])
    with pytest.raises(ConfigError, match=r"guidance\.0\.weighting: SDS weighting 'no_such_mod:f' .*failed to load: ModuleNotFoundError"):
        load_recipe("oracle-nerf", ["guidance.0.weighting=no_such_mod:f"])
    assert get_weighting("fantasia3d")(torch.tensor([0.25])).item() == pytest.approx(0.5 * 0.75)


# --- Perp-Neg needs the view-dependent prompts -------------------------------------------------


def test_perp_neg_without_view_dependent_prompts_is_an_error():
    with pytest.raises(ConfigError, match=r"guidance\.0: Perp-Neg is built from the view-dependent prompts .*prior\.view_dependent_prompts is false"):
        load_recipe("dreamfusion-sd", ["guidance.0.name=sds-perp-neg", "guidance.0.prior.view_dependent_prompts=false"])
    load_recipe("dreamfusion-sd", ["guidance.0.name=sds-perp-neg"])  # on by default: fine


def test_perp_neg_checks_a_built_prior_too(monkeypatch):
    """A prior given by other means (e.g. shared by name) is checked on its built config."""
    from types import SimpleNamespace

    from distill3d.engine.interfaces import BuildContext
    from distill3d.guidance import sds as sds_module
    from distill3d.guidance.perp_neg import PerpNegSDSConfig, PerpNegSDSGuidance

    class ViewPrior(torch.nn.Module):
        config = SimpleNamespace(view_dependent_prompts=False)
        num_train_timesteps = 1000

        def view_conditions(self, cameras):
            raise AssertionError

    monkeypatch.setattr(sds_module, "build_prior", lambda ctx, spec, path: ViewPrior())
    with pytest.raises(ConfigError, match="view_dependent_prompts is false"):
        PerpNegSDSGuidance(PerpNegSDSConfig(prior="shared-sd"), BuildContext())


# --- the dreamfusion recipes follow threestudio (converted to this project's conventions) -----


@pytest.mark.parametrize("recipe, scale", [("dreamfusion-sd", 101.0), ("dreamfusion-if", 21.0)])
def test_dreamfusion_recipes_use_threestudio_settings(recipe, scale):
    r = load_recipe(recipe)
    # threestudio: eps_c + s (eps_c - eps_u) with s = 100 (SD) / 20 (IF); ours eps_u + s' (eps_c - eps_u): s' = s + 1.
    assert r.guidance[0]["guidance_scale"] == scale
    assert r.cameras.elevation == (-10.0, 90.0)  # threestudio's elevation_range for both
    rep = r.representation
    assert rep["orientation_weight"] == {"linear": [[0, 10.0], [5000, 1000.0]]}  # lambda_orient [0, 10, 1000, 5000]
    assert rep["opacity_weight"] == 1.0  # lambda_sparsity 1


# --- view buckets (methods.md: overhead if elevation > 60; front |az| < 45; back |az| > 135) ---


@pytest.mark.parametrize(
    "elevation, azimuth, expected",
    [
        (0, 0, FRONT), (0, 44.9, FRONT), (0, -44.9, FRONT), (0, 45, SIDE), (0, -45, SIDE),
        (0, 90, SIDE), (0, -90, SIDE), (0, 135, SIDE), (0, -135, SIDE), (0, 135.1, BACK), (0, -135.1, BACK),
        (0, 180, BACK), (0, -180, BACK), (0, 200, BACK), (0, 315.5, FRONT), (0, -340, FRONT), (0, 405, SIDE),
        (60, 0, FRONT), (60.1, 0, OVERHEAD), (89, 170, OVERHEAD), (90, -90, OVERHEAD), (-10, 180, BACK), (-80, 0, FRONT),
    ],
)
def test_view_buckets_match_methods_md(elevation, azimuth, expected):
    got = view_directions(torch.tensor([float(elevation)]), torch.tensor([float(azimuth)]))
    assert int(got[0]) == expected
