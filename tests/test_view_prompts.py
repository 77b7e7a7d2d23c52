"""Direction buckets, view prompts and Perp-Neg's azimuth interpolation weights at the boundaries."""

from __future__ import annotations

import math

import pytest
import torch

from distill3d.engine.cameras import make_cameras
from distill3d.guidance.view_prompts import (
    BACK,
    DIRECTIONS,
    FRONT,
    OVERHEAD,
    SIDE,
    DirectionThresholds,
    camera_directions,
    join_prompts,
    mix_condition,
    perp_neg_plan,
    select_condition,
    view_directions,
    view_prompt,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


def plan_at(az, elevation=0.0, **kw):
    return perp_neg_plan(t(elevation), t(az), **kw)


@pytest.mark.parametrize(
    "azimuth, expected",
    [
        (0.0, FRONT), (44.9, FRONT), (-44.9, FRONT), (45.0, SIDE), (-45.0, SIDE), (90.0, SIDE), (-90.0, SIDE),
        (135.0, SIDE), (-135.0, SIDE), (135.1, BACK), (-135.1, BACK), (180.0, BACK), (-180.0, BACK), (179.9, BACK),
        (360.0, FRONT), (225.0, SIDE),  # wrapped: 360 -> 0, 225 -> -135
    ],
)
def test_azimuth_buckets(azimuth, expected):
    assert view_directions(t(0.0), t(azimuth)).item() == expected


def test_overhead_bucket_is_strict_and_overrides_azimuth():
    d = view_directions(t(60.0, 60.01, 89.0, 61.0), t(0.0, 0.0, 180.0, 90.0))
    assert d.tolist() == [FRONT, OVERHEAD, OVERHEAD, OVERHEAD]
    # Looking from below is never "overhead".
    assert view_directions(t(-80.0), t(0.0)).item() == FRONT


def test_custom_thresholds_and_cameras():
    th = DirectionThresholds(overhead_elevation=30.0, front_azimuth=60.0, back_azimuth=120.0)
    assert view_directions(t(0, 0, 0, 40), t(50, 100, 130, 0), th).tolist() == [FRONT, SIDE, BACK, OVERHEAD]
    cams = make_cameras(t(10, 10, 70), t(0, 170, 90), t(3, 3, 3), t(40, 40, 40))
    assert camera_directions(cams).tolist() == [FRONT, BACK, OVERHEAD]


def test_view_prompt_text():
    assert DIRECTIONS == ("front", "side", "back", "overhead")
    assert view_prompt("a cat", "back") == "a cat, back view"
    assert view_prompt("a cat", OVERHEAD) == "a cat, overhead view"
    with pytest.raises(ValueError, match="unknown view direction"):
        view_prompt("a cat", "bottom")
    assert join_prompts("ugly", "face") == "ugly, face"
    assert join_prompts("", "face") == "face"
    assert join_prompts("ugly", "") == "ugly"


# --- Perp-Neg interpolation, stable-dreamfusion weighting (the default) ------------------------


def test_sdf_front_view():
    p = plan_at(0.0)
    assert p.positive_mix[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    assert p.negative_directions[0].tolist() == [FRONT, SIDE]
    # r = 1 > 0.8: no front negative; side negative = exp(-10 * 0) * -2.
    assert p.negative_weights[0].tolist() == pytest.approx([0.0, -2.0])


def test_sdf_half_way_front_side():
    p = plan_at(45.0)
    assert p.positive_mix[0].tolist() == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert p.negative_weights[0].tolist() == pytest.approx([math.exp(-1.0) * -2, math.exp(-5.0) * -2])


@pytest.mark.parametrize("az", [90.0, -90.0])
def test_sdf_pure_side_and_continuity(az):
    p = plan_at(az)
    assert p.positive_mix[0].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])
    # Back half at r = 1: negatives [side, front] with weights [0, -2].
    assert p.negative_directions[0].tolist() == [SIDE, FRONT]
    assert p.negative_weights[0].tolist() == pytest.approx([0.0, -2.0])
    # Just inside the front half (r -> 0): negatives [front, side] with weights [-2, 0]: same per direction.
    q = plan_at(math.copysign(89.999, az))
    by_dir_q = dict(zip(q.negative_directions[0].tolist(), q.negative_weights[0].tolist()))
    by_dir_p = dict(zip(p.negative_directions[0].tolist(), p.negative_weights[0].tolist()))
    assert by_dir_q[FRONT] == pytest.approx(by_dir_p[FRONT], abs=1e-3)
    assert by_dir_q[SIDE] == pytest.approx(by_dir_p[SIDE], abs=1e-3)
    assert q.positive_mix[0].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0], abs=1e-4)


@pytest.mark.parametrize("az", [180.0, -180.0])
def test_sdf_back_view(az):
    p = plan_at(az)
    assert p.positive_mix[0].tolist() == pytest.approx([0.0, 0.0, 1.0, 0.0])
    # r = 0: side weight exp(0) * -2 / 2 = -1, front weight -2.
    assert p.negative_weights[0].tolist() == pytest.approx([-1.0, -2.0])


def test_sdf_back_half_and_thresholds():
    p = plan_at(135.0)  # r = 0.5
    assert p.positive_mix[0].tolist() == pytest.approx([0.0, 0.5, 0.5, 0.0])
    assert p.negative_weights[0].tolist() == pytest.approx([math.exp(-5.0) * -1.0, -2.0])
    # r > 0.8 zeroes the side term in the back half (az < 108 deg).
    assert plan_at(100.0).negative_weights[0, 0].item() == 0.0
    # Front half: r > 0.8 (|az| < 18) zeroes the front term, r < 0.2 (|az| > 72) the side term.
    assert plan_at(17.0).negative_weights[0, 0].item() == 0.0
    assert plan_at(19.0).negative_weights[0, 0].item() == pytest.approx(math.exp(-2 * (1 - 19 / 90)) * -2, rel=1e-5)
    assert plan_at(73.0).negative_weights[0, 1].item() == 0.0
    assert plan_at(71.0).negative_weights[0, 1].item() == pytest.approx(math.exp(-10 * (71 / 90)) * -2, rel=1e-5)


def test_sdf_settings_scale_weights():
    p = plan_at(0.0, negative_w=-4.0)
    assert p.negative_weights[0].tolist() == pytest.approx([0.0, -4.0])
    p = plan_at(45.0, front_decay=1.0, side_decay=2.0)
    assert p.negative_weights[0].tolist() == pytest.approx([math.exp(-0.5) * -2, math.exp(-1.0) * -2])


# --- threestudio weighting -------------------------------------------------------------------


def f(a, b, c, r):
    return a * math.exp(-b * r) + c


def test_threestudio_weights():
    p = plan_at(0.0, weighting="threestudio")
    assert p.negative_weights[0].tolist() == pytest.approx([-f(4, 0.5, -2.426, 1.0), -f(4, 0.5, -2.426, 0.0)], abs=1e-6)
    assert p.negative_weights[0, 0].item() == pytest.approx(0.0, abs=2e-4)  # 4/sqrt(e) - 2.426 ~ 1.2e-4
    p = plan_at(45.0, weighting="threestudio")
    assert p.negative_weights[0].tolist() == pytest.approx([-f(4, 0.5, -2.426, 0.5), -f(4, 0.5, -2.426, 0.5)], abs=1e-6)
    p = plan_at(180.0, weighting="threestudio")
    assert p.negative_directions[0].tolist() == [SIDE, FRONT]
    assert p.negative_weights[0].tolist() == pytest.approx([-(1 - 0.606), -(1 + 0.967)], abs=1e-6)
    p = plan_at(135.0, weighting="threestudio")
    assert p.positive_mix[0].tolist() == pytest.approx([0.0, 0.5, 0.5, 0.0])
    assert p.negative_weights[0].tolist() == pytest.approx([-f(1, 0.5, -0.606, 0.5), -f(1, 0.5, 0.967, 0.5)], abs=1e-6)


def test_threestudio_continuous_at_side():
    inside, at = plan_at(89.999, weighting="threestudio"), plan_at(90.0, weighting="threestudio")
    for p in (inside, at):
        assert p.positive_mix[0, SIDE].item() == pytest.approx(1.0, abs=1e-4)
    w_in = dict(zip(inside.negative_directions[0].tolist(), inside.negative_weights[0].tolist()))
    w_at = dict(zip(at.negative_directions[0].tolist(), at.negative_weights[0].tolist()))
    assert w_in[FRONT] == pytest.approx(w_at[FRONT], abs=1e-3)
    assert w_in[SIDE] == pytest.approx(w_at[SIDE], abs=1e-3)


@pytest.mark.parametrize("weighting", ["stable-dreamfusion", "threestudio"])
def test_overhead_uses_overhead_prompt_without_negatives(weighting):
    p = perp_neg_plan(t(70.0, 10.0), t(30.0, 30.0), weighting=weighting)
    assert p.positive_mix[0].tolist() == [0.0, 0.0, 0.0, 1.0]
    assert p.negative_weights[0].tolist() == [0.0, 0.0]
    assert p.positive_mix[1, OVERHEAD].item() == 0.0
    # An explicit overhead mask (the prior's own buckets) wins over the elevation threshold.
    q = perp_neg_plan(t(70.0), t(30.0), overhead=torch.tensor([False]), weighting=weighting)
    assert q.positive_mix[0, OVERHEAD].item() == 0.0


def test_mix_is_convex_everywhere():
    az = torch.linspace(-180, 179.9, 721)
    for weighting in ("stable-dreamfusion", "threestudio"):
        p = perp_neg_plan(torch.zeros_like(az), az, weighting=weighting)
        assert torch.allclose(p.positive_mix.sum(1), torch.ones(len(az)))
        assert (p.positive_mix >= 0).all()
        assert (p.negative_weights <= 1e-6).all()
        # symmetric in azimuth
        q = perp_neg_plan(torch.zeros_like(az), -az, weighting=weighting)
        inner = az.abs() < 180
        assert torch.allclose(p.negative_weights[inner], q.negative_weights[inner], atol=1e-5)


def test_unknown_weighting():
    with pytest.raises(ValueError, match="Perp-Neg weighting"):
        plan_at(0.0, weighting="nope")


def test_mix_and_select_condition():
    directional = {"e": torch.arange(4, dtype=torch.float32).view(4, 1, 1) * torch.ones(4, 2, 3), "ids": torch.arange(4).view(4, 1)}
    mix = torch.tensor([[0.25, 0.75, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    out = mix_condition(directional, mix)
    assert out["e"].shape == (2, 2, 3)
    assert torch.allclose(out["e"][0], torch.full((2, 3), 0.75))
    assert torch.allclose(out["e"][1], torch.full((2, 3), 3.0))
    assert out["ids"].view(-1).tolist() == [1, 3]  # non-float: the dominant direction
    sel = select_condition(directional, torch.tensor([2, 0, 2]))
    assert sel["e"][:, 0, 0].tolist() == [2.0, 0.0, 2.0]
