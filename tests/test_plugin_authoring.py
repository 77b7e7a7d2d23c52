"""What a plugin author sees: broken plugins are named (plugin, distribution, recipe key), loading
survives sys.exit at import, `distill3d plugins` fails when a plugin does, `--show` prints settings,
and a plugin rejecting its settings is a user error."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from distill3d.engine.errors import UserError
from distill3d.engine.interfaces import BuildContext
from distill3d.plugins.registry import PluginError, Registry, build_plugin, show_plugin

AUTHOR_MODULE = '''
from dataclasses import dataclass
from distill3d.engine.interfaces import Guidance, Prior, Representation

@dataclass
class Cfg:
    target: float = 0.5

class NotAGuidance:                      # forgot the base class
    Config = Cfg
    def forward(self, out, cameras, step): return {}

class PlainConfig(Guidance):             # Config is not a dataclass
    class Config:
        target = 0.5
    def forward(self, out, cameras, step): return {}

class NoForward(Guidance):               # forgot forward()
    Config = Cfg

class NoRender(Representation):
    Config = Cfg

class HalfPrior(Prior):                  # has conditions() only
    Config = Cfg
    def conditions(self, cameras, out): return {}, {}

class Picky(Guidance):                   # rejects its settings in __init__
    Config = Cfg
    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        if config.target > 1:
            raise ValueError(f"target must be at most 1, got {config.target}")
    def forward(self, out, cameras, step): return {}

def not_a_class(): pass
'''

ENTRIES = {
    "distill3d.guidance": {
        "no-base": "author_plugins:NotAGuidance", "plain-config": "author_plugins:PlainConfig",
        "no-forward": "author_plugins:NoForward", "picky": "author_plugins:Picky",
        "a-function": "author_plugins:not_a_class", "exits": "exits_at_import:Thing",
    },
    "distill3d.representations": {"no-render": "author_plugins:NoRender"},
    "distill3d.priors": {"half-prior": "author_plugins:HalfPrior"},
}


@pytest.fixture
def author_dist(tmp_path, monkeypatch) -> Path:
    """A fake installed distribution 'author-plugins' with broken plugins, on sys.path."""
    (tmp_path / "author_plugins.py").write_text(AUTHOR_MODULE)
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit('this plugin calls sys.exit at import')\n")
    info = tmp_path / "author_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: author-plugins\nVersion: 0.1\n")
    text = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()) for group, entries in ENTRIES.items())
    (info / "entry_points.txt").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return tmp_path


@pytest.mark.parametrize(
    "kind, name, problem",
    [
        ("guidance", "no-base", r"NotAGuidance does not subclass distill3d\.engine\.interfaces\.Guidance"),
        ("guidance", "plain-config", r"PlainConfig\.Config is not a dataclass"),
        ("guidance", "no-forward", r"NoForward does not implement forward\(\)"),
        ("guidance", "a-function", r"is a function, not a class"),
        ("representation", "no-render", r"NoRender does not implement render\(\)"),
        ("prior", "half-prior", r"does not implement predict_noise\(\).*does not implement encode_images\(\) or encode_render\(\)"),
    ],
)
def test_registration_checks_name_plugin_distribution_and_key(author_dist, kind, name, problem):
    with pytest.raises(PluginError) as info:
        Registry(kind).get(name, "guidance.2")
    message = str(info.value)
    assert message.startswith("guidance.2: ")
    assert f"{kind} plugin '{name}' from author-plugins (author_plugins:" in message
    import re

    assert re.search(problem, message), message


def test_recipe_names_the_key_of_a_broken_plugin(author_dist):
    from distill3d.engine.recipe import load_recipe

    with pytest.raises(UserError, match=r"guidance\.1: guidance plugin 'no-forward' from author-plugins .*does not implement forward"):
        load_recipe("oracle-nerf", ["guidance=[{name: sds}, {name: no-forward}]"])


def test_sys_exit_at_import_is_reported_not_fatal(author_dist):
    registry = Registry("guidance")
    problem = registry.check("exits")
    assert "failed to load: SystemExit: this plugin calls sys.exit at import" in problem
    assert registry.get("sds").__name__ == "SDSGuidance"  # the others still load


def test_value_error_in_init_is_a_user_error_with_the_key(author_dist):
    ok = build_plugin("guidance", {"name": "picky", "target": 0.5}, BuildContext(), "guidance.3")
    assert ok.config.target == 0.5
    with pytest.raises(PluginError, match=r"^guidance\.3: guidance plugin 'picky' from author-plugins \(author_plugins:Picky\) "
                                          r"rejected its settings: target must be at most 1, got 2\.0$"):
        build_plugin("guidance", {"name": "picky", "target": 2.0}, BuildContext(), "guidance.3")


def test_nested_plugin_errors_pass_through_unchanged():
    """A guidance whose prior rejects its settings: the prior's own key is named, not re-wrapped."""
    with pytest.raises(UserError) as info:
        build_plugin("guidance", {"name": "sds", "prior": {"name": "oracle", "noise_std": -1.0}}, BuildContext(), "guidance.0")
    assert "prior: noise_std must be >= 0" in str(info.value) and "rejected its settings" not in str(info.value)


def run_cli(*args):
    """The CLI in this process (entry points on the test's sys.path are seen, no re-import)."""
    from typer.testing import CliRunner

    from distill3d.engine.cli import app

    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_plugins_command_lists_everything_and_exits_nonzero_on_failures(author_dist):
    code, out, err = run_cli("plugins")
    assert code == 1, err
    # The plugin calling sys.exit at import neither ends the listing nor hides the rest.
    assert "exits" in out and "SystemExit" in out
    assert "[ok]" in out and "picky" in out and "sds" in out and "oracle" in out
    assert out.count("FAILED") == 7
    assert "7 plugin(s) FAILED" in err and "Traceback" not in err


def test_plugins_show_prints_settings_with_defaults():
    lines = show_plugin("sds")
    text = "\n".join(lines)
    assert lines[0] == "guidance plugin 'sds' from distill3d (distill3d.guidance.sds:SDSGuidance)"
    assert "guidance_scale: float = 100.0" in text
    assert "  timesteps: TimestepConfig" in text and "    t_max: float = 0.98  (min 0.0, max 1.0)" in text  # nested, expanded
    assert "schedule: one of 'fixed', 'linear', 'sqrt', 'deterministic' = 'fixed'" in text
    assert "grad_clip: float | int | dict | None = None" in text
    code, out, _ = run_cli("plugins", "--show", "nerf")
    assert code == 0 and "log2_table_size: int = 19" in out and "  occupancy: OccupancyConfig" in out
    code, _, err = run_cli("plugins", "--show", "nope")
    assert code == 2 and err.startswith("error: no plugin named 'nope'; registered: ") and "sds" in err
