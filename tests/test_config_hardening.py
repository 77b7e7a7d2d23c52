"""Config hardening: NaN/inf rejected with the key named, `1e-3` is a number, range metadata,
text that is not UTF-8."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from distill3d.engine.config import ConfigError, bounded, from_dict, load_yaml, parse_override, validate_prompt, yaml_load
from distill3d.engine.recipe import load_recipe


@dataclass
class Inner:
    lr: float = bounded(0.01, gt=0.0)


@dataclass
class Limits:
    resolution: int = bounded(64, min=8, max=4096)
    every: int = bounded(10, min=1)
    elevation: tuple[float, float] = bounded((-10.0, 45.0), min=-90, max=90)
    weight: float | dict = bounded(1.0, min=0)  # a number or a schedule
    inner: Inner = field(default_factory=Inner)
    anything: dict = field(default_factory=dict)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"weight": float("nan")}, r"^weight: nan is not a finite number"),
        ({"inner": {"lr": float("inf")}}, r"^inner\.lr: inf is not a finite number"),
        ({"elevation": [0, float("-inf")]}, r"^elevation\.1: -inf is not a finite number"),
        ({"anything": {"deep": [1, float("nan")]}}, r"^anything\.deep\.1: nan is not a finite number"),
        ({"weight": {"linear": [[0, 1.0], [100, float("nan")]]}}, r"^weight\.linear\.1\.1: nan"),
    ],
)
def test_non_finite_values_are_rejected_with_the_key(data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_dict(Limits, data)


def test_yaml_nan_from_an_override_is_rejected():
    with pytest.raises(ConfigError, match=r"guidance\.0\.guidance_scale: nan is not a finite number"):
        load_recipe("oracle-nerf", ["guidance.0.guidance_scale=.nan"])
    with pytest.raises(ConfigError, match=r"trainer\.lr_scale: inf is not a finite number"):
        load_recipe("oracle-nerf", ["trainer.lr_scale=.inf"])


def test_exponent_without_a_dot_is_a_number(tmp_path):
    assert parse_override("a.b=1e-3") == (["a", "b"], 0.001)
    assert parse_override("a=5E4")[1] == 50000.0 and parse_override("a=-2e+2")[1] == -200.0
    assert parse_override("a=1e")[1] == "1e"  # not a number: stays text
    path = tmp_path / "r.yaml"
    path.write_text("lr: 1e-3\nname: 2e5x\n")
    assert load_yaml(path) == {"lr": 0.001, "name": "2e5x"}
    assert from_dict(Inner, {"lr": "1e-3"}).lr == 0.001  # as a plain YAML 1.1 loader leaves it
    recipe = load_recipe("oracle-nerf", ["guidance.0.prior.noise_std=5e-2"])
    assert recipe.guidance[0]["prior"]["noise_std"] == 0.05
    assert yaml_load("x: 1e3") == {"x": 1000.0}


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"resolution": 4}, r"^resolution: must be at least 8, got 4"),
        ({"resolution": 10000}, r"^resolution: must be at most 4096, got 10000"),
        ({"every": 0}, r"^every: must be at least 1, got 0"),
        ({"elevation": [-10, 120]}, r"^elevation\.1: must be at most 90, got 120\.0"),
        ({"weight": -1}, r"^weight: must be at least 0"),
        ({"weight": {"linear": [[0, 1.0], ["50%", -2.0]]}}, r"^weight\.linear\.1: must be at least 0, got -2\.0"),
        ({"inner": {"lr": 0}}, r"^inner\.lr: must be greater than 0\.0, got 0\.0"),
    ],
)
def test_ranges_from_field_metadata(data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_dict(Limits, data)


def test_ranges_allow_good_values():
    cfg = from_dict(Limits, {"resolution": 8, "every": 1, "elevation": [-90, 90], "weight": {"linear": [[0, 0.0], [9, 3.0]]}})
    assert cfg.resolution == 8 and cfg.elevation == (-90.0, 90.0)


def test_timestep_fractions_are_range_checked_in_recipes():
    with pytest.raises(ConfigError, match=r"guidance\.0\.timesteps\.t_max: must be at most 1\.0, got 1\.5"):
        load_recipe("oracle-nerf", ["guidance.0.timesteps.t_max=1.5"])
    with pytest.raises(ConfigError, match=r"guidance\.0\.timesteps: t_min \(0\.9\) is above t_max \(0\.5\)"):
        load_recipe("oracle-nerf", ["guidance.0.timesteps.t_min=0.9", "guidance.0.timesteps.t_max=0.5"])


def test_text_that_is_not_utf8_is_a_clear_error(tmp_path):
    bad = b"a \xff cat".decode("utf-8", "surrogateescape")  # how Python hands over such an argument
    with pytest.raises(ConfigError, match=r"^prompt: not valid UTF-8 text \(byte 0xff at position 2\)"):
        validate_prompt(bad)
    assert validate_prompt("un chat déjà vu, 猫") == "un chat déjà vu, 猫"
    with pytest.raises(ConfigError, match=r"^prompt: not valid UTF-8"):
        load_recipe("oracle-nerf", ["prompt=" + bad])
    path = tmp_path / "latin1.yaml"
    path.write_bytes("prompt: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml is not UTF-8 text \(byte 0xe9"):
        load_yaml(path)


def test_non_utf8_prompt_on_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "distill3d.engine.cli", "generate", b"a \xff cat", "--recipe", "oracle-nerf", "--out", str(tmp_path / "r")],
        capture_output=True, timeout=300,
    )
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and err.startswith("error: ") and "not valid UTF-8 text" in err and "position 2" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r" / "checkpoints").exists()
