"""Entry-point discovery: built-ins, clashes, broken plugins, and a real third-party install."""

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from distill3d.plugins.registry import PluginError, Registry

REPO = Path(__file__).resolve().parents[1]


def fake_distribution(root: Path, dist: str, group: str, entries: dict[str, str]) -> None:
    info = root / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[{group}]\n{lines}\n")


@pytest.fixture
def extra_path(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return tmp_path


def test_builtins_are_registered_through_entry_points():
    assert {"nerf"} <= set(Registry("representation").names())
    assert {"sds", "reference"} <= set(Registry("guidance").names())
    assert "oracle" in Registry("prior").names()
    info = {i.name: i for i in Registry("guidance").infos()}
    assert info["sds"].distribution == "distill3d"


def test_unknown_name_lists_available():
    with pytest.raises(PluginError, match=r"unknown representation 'voxels'; available: .*nerf"):
        Registry("representation").get("voxels")


def test_name_clash_names_both_distributions(extra_path):
    fake_distribution(extra_path, "other-plugins", "distill3d.representations", {"nerf": "other_pkg:NeRF"})
    with pytest.raises(PluginError, match=r"registered twice.*(distill3d.*other-plugins|other-plugins.*distill3d)"):
        Registry("representation").get("nerf")


def test_broken_plugin_is_reported_and_others_still_load(extra_path):
    fake_distribution(extra_path, "broken-plugin", "distill3d.guidance", {"broken": "no_such_module_xyz:Thing"})
    registry = Registry("guidance")
    assert "broken" in registry.names()
    with pytest.raises(PluginError, match=r"guidance plugin 'broken' from broken-plugin .*failed to load: ModuleNotFoundError"):
        registry.get("broken")
    assert registry.get("sds").__name__ == "SDSGuidance"
    assert "failed to load" in registry.check("broken")


def test_example_plugin_installs_registers_and_runs(tmp_path, monkeypatch):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(REPO / "plugins" / "example")],
        check=True, capture_output=True, cwd=tmp_path,
    )
    monkeypatch.syspath_prepend(str(target))
    importlib.invalidate_caches()
    registry = Registry("guidance")
    info = {i.name: i for i in registry.infos()}
    assert info["coverage-target"].distribution == "distill3d-example-plugin"

    from distill3d.engine.recipe import load_recipe
    from distill3d.engine.trainer import Trainer

    recipe = load_recipe(
        "oracle-nerf",
        [
            "trainer.steps=3", "trainer.resolution=16", "trainer.video_frames=2", "trainer.video_resolution=16",
            "guidance=[{name: coverage-target, target: 0.5, weight: 2.0}]",
            "representation.log2_table_size=12", "representation.levels=4",
        ],
    )
    trainer = Trainer.create(recipe, tmp_path / "run", quiet=True)
    result = trainer.fit()
    assert result.finished
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert "coverage" in lines[-1]
