"""The two example third-party packages (plugins/example: a guidance; plugins/example_representation:
a representation), registered as installed distributions are, pass the plugin contract and train."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from distill3d.plugins.contract import check_guidance, check_representation
from distill3d.plugins.registry import Registry

REPO = Path(__file__).resolve().parents[1]


def register(root: Path, source: Path, dist: str, group: str, entries: dict[str, str]) -> None:
    """What `pip install` leaves behind: the package importable and a dist-info with entry points."""
    info = root / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))


@pytest.fixture
def examples(tmp_path, monkeypatch):
    site = tmp_path / "site"
    register(site, REPO / "plugins" / "example_representation", "distill3d-example-voxels",
             "distill3d.representations", {"voxel-grid": "distill3d_example_voxels:VoxelGrid"})
    register(site, REPO / "plugins" / "example", "distill3d-example-plugin",
             "distill3d.guidance", {"coverage-target": "distill3d_example:CoverageTargetGuidance"})
    for path in (site, REPO / "plugins" / "example_representation", REPO / "plugins" / "example"):
        monkeypatch.syspath_prepend(str(path))
    importlib.invalidate_caches()
    return tmp_path


def test_examples_are_short_enough_to_read():
    for path in ("plugins/example/distill3d_example/__init__.py", "plugins/example_representation/distill3d_example_voxels/__init__.py"):
        assert len((REPO / path).read_text().splitlines()) < 100, path


def test_example_representation_registers_and_meets_the_contract(examples):
    info = {i.name: i for i in Registry("representation").infos()}
    assert info["voxel-grid"].distribution == "distill3d-example-voxels"
    cls = Registry("representation").get("voxel-grid")
    # Shapes, gradients, checkpoint round trip and a resumed oracle run ending bit-identical.
    check_representation("voxel-grid", cls.contract_settings, examples)


def test_example_guidance_meets_the_contract(examples):
    check_guidance("coverage-target", {"target": 0.4, "weight": 2.0}, examples)


def test_example_representation_learns_the_oracle_scene(examples):
    """Forty oracle steps make the faint grid take the scene's silhouette (measured: IoU 0.81)."""
    from distill3d.engine.recipe import load_recipe
    from distill3d.engine.reference_scene import DEFAULT_SCENE
    from distill3d.engine.trainer import Trainer

    recipe = load_recipe("oracle-nerf", [f"scene={DEFAULT_SCENE}",
        "trainer.steps=40", "trainer.resolution=24", "trainer.eval_views=2", "trainer.eval_resolution=24",
        "trainer.video_frames=2", "trainer.video_resolution=16", "trainer.export=[]", "trainer.checkpoint_every=100",
        "guidance.0.prior.image_size=24", "representation={name: voxel-grid, resolution: 16, samples_per_ray: 24, lr: 0.3}",
    ])
    result = Trainer.create(recipe, examples / "run", quiet=True).fit()
    assert result.finished and result.eval["mask_iou"] > 0.6, result.eval
