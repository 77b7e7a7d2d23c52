from dataclasses import dataclass, field
from typing import Literal

import pytest

from distill3d.engine.config import ConfigError, apply_override, from_dict, parse_override, to_dict
from distill3d.engine.recipe import load_recipe, resolve_recipe


@dataclass
class Inner:
    rate: float = 0.1
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    steps: int = 10
    name: str = "x"
    pair: tuple[float, float] = (0.0, 1.0)
    inner: Inner = field(default_factory=Inner)
    maybe: int | None = None


def test_from_dict_fills_and_converts():
    cfg = from_dict(Outer, {"steps": 5, "pair": [1, 2], "inner": {"rate": 1}})
    assert cfg.steps == 5 and cfg.pair == (1.0, 2.0) and cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert to_dict(cfg)["pair"] == [1.0, 2.0]


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"stepz": 1}, "unknown config key stepz"),
        ({"inner": {"rat": 1}}, "unknown config key inner.rat"),
        ({"steps": "many"}, "steps: expected an integer"),
        ({"steps": 1.5}, "steps: expected an integer"),
        ({"inner": {"mode": "c"}}, "inner.mode: 'c' is not one of"),
        ({"pair": [1, 2, 3]}, "pair: expected 2 values"),
        ({"name": 3}, "name: expected a string"),
        ({"maybe": "x"}, "maybe"),
    ],
)
def test_from_dict_errors_name_the_key(data, fragment):
    with pytest.raises(ConfigError, match=fragment):
        from_dict(Outer, data)


def test_overrides_nested_and_lists():
    data = {"a": {"b": 1}, "g": [{"x": 1}, {"x": 2}]}
    for text in ["a.b=2.5", "g.1.x=[1, 2]", "a.new=hello"]:
        apply_override(data, *parse_override(text))
    assert data == {"a": {"b": 2.5, "new": "hello"}, "g": [{"x": 1}, {"x": [1, 2]}]}
    with pytest.raises(ConfigError, match="not an index"):
        apply_override(data, *parse_override("g.5.x=1"))
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_override("novalue")


def test_recipe_resolution_fills_plugin_defaults_and_names_bad_keys():
    recipe = load_recipe("oracle-nerf", ["trainer.steps=7", "guidance.0.guidance_scale=2"])
    assert recipe.trainer.steps == 7
    assert recipe.guidance[0]["guidance_scale"] == 2.0
    assert recipe.guidance[0]["prior"]["name"] == "oracle"
    assert "noise_std" in recipe.guidance[0]["prior"]  # nested plugin defaults resolved
    assert "samples_per_ray" in recipe.representation
    with pytest.raises(ConfigError, match="representation.levelz"):
        load_recipe("oracle-nerf", ["representation.levelz=3"])
    with pytest.raises(ConfigError, match=r"guidance.0.prior.noise_stdd"):
        load_recipe("oracle-nerf", ["guidance.0.prior.noise_stdd=3"])
    with pytest.raises(ConfigError, match="trainer.steps: expected an integer"):
        load_recipe("oracle-nerf", ["trainer.steps=abc"])


def test_unknown_recipe_lists_shipped_ones():
    with pytest.raises(ConfigError, match="oracle-nerf"):
        load_recipe("no-such-recipe")


def test_unknown_plugin_in_recipe_lists_available():
    with pytest.raises(Exception, match="available: .*nerf"):
        resolve_recipe({"representation": {"name": "voxels"}, "guidance": [{"name": "sds"}]})
