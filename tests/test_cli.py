"""The command line as a user runs it: clear one-line errors, listings, exports."""

import json
import subprocess
import sys

import pytest

from tests.test_trainer import TINY


def run(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "distill3d.engine.cli", *args], capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def sets(items):
    return sum((["--set", s] for s in items), [])


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["generate", "  ", "--recipe", "oracle-nerf"], "the prompt is empty"),
        (["generate", "a cat", "--recipe", "nope"], "unknown recipe 'nope'; shipped recipes: .*oracle-nerf"),
        (["demo", "--set", "representation.levelz=3"], "unknown config key representation.levelz"),
        (["demo", "--set", "trainer.steps=lots"], "trainer.steps: expected an integer"),
        (["demo", "--set", "guidance.0.name=magic"], r"unknown guidance 'magic'; available: .*sds"),
        (["demo", "--set", "representation.hash_encoding_backend=cuda-magic"], "unknown backend 'cuda-magic'"),
        (["demo", "--scene", "/nonexistent/scene.json"], "does not exist.*two_cylinders"),
        (["resume", "/nonexistent/run"], "not a run directory"),
        (["export", "/nonexistent/run", "--format", "fbx"], "unknown export format 'fbx'"),
    ],
)
def test_bad_input_is_one_clear_line(args, fragment, tmp_path):
    code, _, err = run(*args, "--out", str(tmp_path / "r")) if args[0] in ("demo", "generate") else run(*args)
    assert code != 0
    assert "Traceback" not in err
    assert err.startswith("error: ")
    import re

    assert re.search(fragment, err), err


def test_bad_scene_file_names_the_field(tmp_path):
    scene = tmp_path / "scene.json"
    scene.write_text(json.dumps({"primitives": [{"type": "cone", "center": [0, 0, 0], "color": [1, 0, 0]}]}))
    code, _, err = run("demo", "--scene", str(scene), "--out", str(tmp_path / "r"))
    assert code == 2 and "cone" in err and "sphere" in err and "Traceback" not in err


def test_plugins_and_doctor():
    code, out, _ = run("plugins")
    assert code == 0
    assert "nerf" in out and "sds" in out and "oracle" in out and "[ok]" in out
    code, out, _ = run("doctor")
    assert code == 0
    for op in ("hash_encoding", "composite", "march"):
        assert op in out
    assert "cuda" in out and "torch" in out


def test_demo_takes_a_shipped_scene_by_name(tmp_path):
    out = tmp_path / "run"
    code, _, err = run("demo", "--scene", "two_cylinders", "--steps", "2", "--out", str(out), "--quiet", *sets(TINY))
    assert code == 0, err
    assert "two_cylinders.json" in (out / "config.yaml").read_text()


def test_recipes_listing():
    code, out, _ = run("recipes")
    assert code == 0 and "oracle-nerf" in out


def test_export_video_from_a_run(tmp_path):
    out = tmp_path / "run"
    code, _, err = run("demo", "--steps", "2", "--out", str(out), "--quiet", *sets(TINY))
    assert code == 0, err
    code, stdout, err = run("export", str(out), "--format", "gif", "--frames", "3", "--resolution", "16", "--out", str(tmp_path / "t.gif"))
    assert code == 0, err
    import imageio.v3 as iio

    frames = iio.imread(tmp_path / "t.gif")
    assert frames.shape[0] == 3 and frames.shape[1:3] == (16, 16)


def test_export_of_an_empty_surface_says_so_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    tiny_dmtet = [
        "trainer.steps=2", "representation.grid_resolution=16", "representation.init_sphere_radius=0", "trainer.eval_views=2",
        "trainer.video_frames=2", "trainer.video_resolution=16", "trainer.resolution=16", "trainer.eval_resolution=16",
    ]
    # sdf = 0 - |x| < 0 everywhere: no surface. The run itself finishes and says why it wrote no mesh.
    code, _, err = run("generate", "x", "--recipe", "oracle-dmtet", "--reference", "default", "--out", str(out), "--quiet", *sets(tiny_dmtet))
    assert code == 0, err
    assert "no mesh exported" in err and "nothing to export" in err
    before = sorted(p.name for p in out.iterdir())
    for fmt in ("glb", "obj", "ply"):
        code, stdout, err = run("export", str(out), "--format", fmt)
        assert code == 2 and err.startswith("error:") and "nothing to export" in err and stdout == ""
    assert sorted(p.name for p in out.iterdir()) == before  # no mesh file, no temporaries


@pytest.fixture(scope="module")
def nerf_glb(tmp_path_factory):
    """A 30-step demo NeRF exported to GLB through `distill3d export`: (glb path, export stdout)."""
    out = tmp_path_factory.mktemp("nerf-export") / "run"
    code, _, err = run("demo", "--steps", "30", "--out", str(out), "--quiet", *sets(TINY))
    assert code == 0, err
    code, stdout, err = run("export", str(out), "--format", "glb", "--resolution", "48", "--texture-size", "64")
    assert code == 0, err
    return out / "mesh.glb", stdout


def test_export_mesh_from_a_nerf_run(nerf_glb):
    import trimesh

    glb, stdout = nerf_glb
    assert stdout.strip() == str(glb)
    mesh = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) > 100
    assert mesh.visual.material.baseColorTexture is not None
    assert not list(glb.parent.glob(".*tmp*"))


def test_nerf_glb_exported_through_the_cli_passes_the_gltf_validator(nerf_glb):
    from tests.mesh_fixtures import SKIP_NO_VALIDATOR, gltf_validator, validate_gltf

    if gltf_validator() is None:
        pytest.skip(SKIP_NO_VALIDATOR)
    report = validate_gltf(nerf_glb[0])
    assert report["errors"] == 0 and report["warnings"] == 0, report["messages"]
