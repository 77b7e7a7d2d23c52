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


BUILTINS = {
    "nerf": "distill3d.representations.nerf.model:HashGridNeRF",
    "dmtet": "distill3d.representations.dmtet.model:DMTet",
    "sds": "distill3d.guidance.sds:SDSGuidance",
    "sds-perp-neg": "distill3d.guidance.perp_neg:PerpNegSDSGuidance",
    "oracle": "distill3d.guidance.priors.oracle:OraclePrior",
    "stable-diffusion": "distill3d.guidance.priors.stable_diffusion:StableDiffusionPrior",
    "deepfloyd-if": "distill3d.guidance.priors.deepfloyd:DeepFloydIFPrior",
}

PLUGIN_MODULE = """
from dataclasses import dataclass

from distill3d.engine.interfaces import Guidance


class Boom(Guidance):
    \"\"\"Raises an error nobody anticipated at its first step.\"\"\"

    @dataclass
    class Config:
        pass

    def forward(self, out, cameras, step):
        raise RuntimeError(f"boom at step {step}")


class NanFrom(Guidance):
    \"\"\"A finite loss until step `start`, NaN from then on.\"\"\"

    @dataclass
    class Config:
        start: int = 6

    def forward(self, out, cameras, step):
        loss = out.rgb.mean()
        return {"probe": loss * float("nan") if step >= self.config.start else loss * 0.0}
"""


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """An environment whose Python path holds a third-party distribution with two test guidances
    (boom, nan-from) and one that fails to import (broken)."""
    root = tmp_path_factory.mktemp("plugins")
    (root / "cli_test_plugins.py").write_text(PLUGIN_MODULE)
    info = root / "cli_test_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cli-test-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[distill3d.guidance]\nboom = cli_test_plugins:Boom\nnan-from = cli_test_plugins:NanFrom\nbroken = no_such_module_xyz:Thing\n"
    )
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}


def run_env(env, *args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "distill3d.engine.cli", *args], capture_output=True, text=True, timeout=timeout, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def test_plugins_lists_each_builtin_with_its_distribution_and_entry_point_and_flags_a_broken_one(plugin_env):
    code, out, _ = run_env(plugin_env, "plugins")
    assert code == 1  # documented: exit 1 when any plugin fails to load (here: broken)
    lines, group = {}, None
    for line in out.splitlines():
        if line.startswith("  "):
            lines.setdefault(line.split()[0], {})[group] = line
        elif line.strip():
            group = line.split()[0]
    lines = {name: by_group.get("guidance", by_group.get("prior", by_group.get("representation", next(iter(by_group.values())))))
             for name, by_group in lines.items()}  # a name may recur in another group (e.g. a weighting)
    for name, value in BUILTINS.items():
        fields = lines[name].split()
        assert fields[1] == "distill3d" and fields[2] == value and lines[name].endswith("[ok]"), lines[name]
    assert lines["boom"].split()[1] == "cli-test-plugins" and lines["boom"].endswith("[ok]")
    assert "[FAILED:" in lines["broken"] and "ModuleNotFoundError" in lines["broken"] and "cli-test-plugins" in lines["broken"]
    assert sum("[FAILED" in line for line in lines.values()) == 1  # the broken one breaks nothing else


def test_doctor_reports_this_machine_and_the_backend_each_op_uses():
    import torch

    from distill3d.engine.backends import choose

    code, out, _ = run("doctor")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert torch.__version__ in rows["torch"]
    cuda = torch.cuda.is_available()
    assert rows["cuda"].split()[1] == ("yes:" if cuda else "no")
    import xatlas

    assert rows["xatlas"].split()[1] == getattr(xatlas, "__version__", "installed")
    device = torch.device("cuda" if cuda else "cpu")
    for op in ("hash_encoding", "composite", "march", "rasterize"):
        assert rows[op].split()[1:3] == ["->", choose(op, "auto", device)], rows[op]
    if not cuda:  # and why the accelerated ones are not used
        assert "triton: " in rows["hash_encoding"] and "CUDA" in rows["hash_encoding"]


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error: ")]


def test_debug_variable_shows_the_traceback_of_a_user_error(plugin_env, tmp_path):
    # Without it the same error is one line (test_bad_input_is_one_clear_line).
    code, _, err = run_env({**plugin_env, "DISTILL3D_DEBUG": "1"}, "resume", str(tmp_path / "nope"))
    assert code != 0 and "Traceback" in err and "UserError" in err and "not a run directory" in err


def test_unexpected_error_is_one_line_and_exit_1(plugin_env, tmp_path):
    code, _, err = run_env(plugin_env, "demo", "--steps", "3", "--quiet", "--out", str(tmp_path / "a"), *sets([*TINY, "guidance=[{name: boom}]"]))
    assert code == 1, err
    assert error_lines(err) == ["error: RuntimeError: boom at step 0"] and "DISTILL3D_DEBUG=1" in err and "Traceback" not in err


def test_nan_loss_through_the_cli_stops_naming_the_step_and_keeps_the_last_checkpoint(plugin_env, tmp_path):
    from distill3d.engine.checkpoint import latest_checkpoint, load_checkpoint

    out = tmp_path / "run"
    guidance = "guidance=[{name: sds, guidance_scale: 1.0, prior: {name: oracle}}, {name: nan-from, start: 6}]"
    code, _, err = run_env(plugin_env, "demo", "--steps", "12", "--out", str(out), "--quiet", *sets([*TINY, guidance, "trainer.checkpoint_every=4"]))
    assert code == 2 and "Traceback" not in err, err
    (line,) = error_lines(err)
    assert line.startswith("error: loss became non-finite at step 6") and "step_0000004.pt" in line and "resume" in line
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt.name == "step_0000004.pt"
    state = load_checkpoint(ckpt)["representation"]
    assert all(torch_isfinite(v) for v in state.values())


def torch_isfinite(v) -> bool:
    import torch

    return not v.is_floating_point() or bool(torch.isfinite(v).all())


def test_perp_neg_needs_an_sds_guidance_with_a_text_prior(tmp_path):
    code, _, err = run("generate", "a cat", "--recipe", "oracle-nerf", "--perp-neg", "--out", str(tmp_path / "a"), *sets(["guidance=[{name: reference}]"]))
    assert code == 2 and err.startswith("error: ") and "--perp-neg" in err and "sds" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()
    # An sds guidance over the oracle (no view-dependent text prompts): also a clear error.
    code, _, err = run("generate", "a cat", "--recipe", "oracle-nerf", "--perp-neg", "--out", str(tmp_path / "b"), *sets(TINY))
    assert code == 2 and err.startswith("error: ") and ("text prior" in err or "view-dependent" in err) and "Traceback" not in err


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
