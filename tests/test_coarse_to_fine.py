"""Coarse-to-fine: DMTet seeded from a NeRF run, through the CLI, ending in a GLB."""

import subprocess
import sys

import pytest
import torch

from distill3d.engine.cameras import orbit_cameras
from distill3d.engine.config import from_dict
from distill3d.engine.evaluation import mask_iou
from distill3d.engine.interfaces import BuildContext, RenderSettings
from distill3d.representations.dmtet.model import DMTet, DMTetConfig
from tests.mesh_fixtures import SKIP_NO_VALIDATOR, gltf_validator, make_textured_reference, validate_gltf
from tests.test_nerf import make as make_nerf
from tests.test_trainer import TINY


def test_dmtet_initialised_from_a_nerf_matches_its_silhouette_and_colour():
    # A sharp blob (density 1000 (1 - r / 0.5) before softplus): renders and the threshold agree.
    nerf = make_nerf(samples_per_ray=64, blob_scale=1000.0)
    dmtet = DMTet(from_dict(DMTetConfig, {"grid_resolution": 24, "hidden_layers": 1}), BuildContext(total_steps=10))
    done = dmtet.initialize_from(nerf, texture_steps=60)
    assert done["threshold"] == pytest.approx(nerf.surface_threshold)
    cams = orbit_cameras(3, distance=3.0)
    settings = RenderSettings(32, 32, shading="albedo", background="solid", training=False)
    with torch.no_grad():
        a, b = nerf.render(cams, settings), dmtet.render(cams, settings)
    assert mask_iou(a.opacity[..., 0] > 0.5, b.opacity[..., 0] > 0.5) > 0.9
    inside = (a.opacity[..., 0] > 0.9) & (b.opacity[..., 0] > 0.9)
    assert (a.rgb[inside] - b.rgb[inside]).abs().mean() < 0.05  # inherited texture
    assert done["texture_mse"] < 1e-3


def run(*args):
    proc = subprocess.run([sys.executable, "-m", "distill3d.engine.cli", *args], capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def c2f_run(tmp_path_factory):
    """demo --stages nerf,dmtet from a textured mesh reference, at toy sizes."""
    tmp_path = tmp_path_factory.mktemp("c2f")
    reference = make_textured_reference(tmp_path / "reference.glb", texture_size=64)
    out = tmp_path / "run"
    sets = [f"nerf:{s}" for s in TINY] + [
        "dmtet:representation.grid_resolution=16", "dmtet:trainer.resolution=16", "dmtet:trainer.steps=3",
        "dmtet:trainer.eval_views=2", "dmtet:trainer.eval_resolution=16", "dmtet:trainer.video_frames=2",
        "dmtet:trainer.video_resolution=16",
    ]
    code, _, err = run(
        "demo", "--stages", "nerf,dmtet", "--reference", str(reference), "--steps", "40", "--out", str(out),
        *sum((["--set", s] for s in sets), []),
    )
    assert code == 0, err
    return reference, out, err


def test_demo_stages_nerf_then_dmtet_from_a_textured_mesh_reference_writes_a_glb(c2f_run):
    import trimesh

    reference, out, err = c2f_run
    assert "initialised from" in err and (out / "nerf" / "eval.json").exists() and (out / "dmtet" / "eval.json").exists()
    assert str(out / "nerf") in (out / "dmtet" / "config.yaml").read_text()
    assert str(reference) in (out / "dmtet" / "config.yaml").read_text()
    mesh = trimesh.load(out / "dmtet" / "mesh.glb", force="mesh")
    assert mesh.visual.material.baseColorTexture is not None
    assert len(mesh.faces) > 0


def test_dmtet_glbs_pass_the_gltf_validator(c2f_run, tmp_path):
    """The GLB the run wrote and one exported through `distill3d export`, through the Khronos validator."""
    if gltf_validator() is None:
        pytest.skip(SKIP_NO_VALIDATOR)
    _, out, _ = c2f_run
    exported = tmp_path / "exported.glb"
    code, _, err = run("export", str(out / "dmtet"), "--format", "glb", "--texture-size", "64", "--out", str(exported))
    assert code == 0, err
    for glb in (out / "dmtet" / "mesh.glb", exported):
        report = validate_gltf(glb)
        assert report["errors"] == 0 and report["warnings"] == 0, (glb, report["messages"])


def test_bad_stages_and_init_from_are_clear_errors(tmp_path):
    code, _, err = run("demo", "--stages", "dmtet", "--out", str(tmp_path / "a"))
    assert code == 2 and "--stages" in err
    code, _, err = run("generate", "x", "--recipe", "oracle-dmtet", "--init-from", str(tmp_path / "nope"), "--out", str(tmp_path / "b"))
    assert code == 2 and "not a run directory" in err
