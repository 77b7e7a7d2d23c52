"""The textured-mesh representation (DreamGaussian's second stage: fixed geometry, trainable UV
texture) and the refine guidance (image MSE against multi-step denoised renders)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from distill3d.engine.cameras import make_cameras
from distill3d.engine.config import ConfigError
from distill3d.engine.errors import UserError
from distill3d.engine.interfaces import BuildContext, RenderSettings
from distill3d.engine.pipeline import load_pipeline
from distill3d.guidance.refine import ddim_timesteps
from distill3d.plugins.registry import build_plugin


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sphere_files(tmp_path):
    """A grey sphere (.obj, no UVs) and the same sphere coloured red on top, blue below (.ply):
    the representation starts from the first, the oracle's scene is the second."""
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.8)  # the size the oracle normalises a mesh scene to
    grey = tmp_path / "grey.obj"
    sphere.export(grey)
    top = sphere.vertices[:, 1] > 0
    colours = np.where(top[:, None], [230, 30, 30, 255], [30, 30, 230, 255]).astype(np.uint8)
    coloured = trimesh.Trimesh(sphere.vertices, sphere.faces, vertex_colors=colours, process=False)
    scene = tmp_path / "scene.ply"
    coloured.export(scene)
    return grey, scene


def cameras(n=4):
    az = torch.linspace(0, 360, n + 1)[:-1]
    el = torch.tensor([20.0, -20.0] * (n // 2))
    return make_cameras(el, az, torch.full((n,), 3.2), torch.full((n,), 40.0))


def build(spec, tmp_path, scene=None, steps=20):
    ctx = BuildContext(total_steps=steps, scene=scene, cache_dir=tmp_path / "cache")
    return build_plugin("representation", spec, ctx, "representation"), ctx


def test_texture_gets_gradient_and_its_own_group(tmp_path):
    grey, _ = sphere_files(tmp_path)
    rep, _ = build({"name": "textured-mesh", "mesh": str(grey), "texture_size": 64, "lr_texture": 0.05}, tmp_path)
    assert rep.texture_logits.shape == (64, 64, 3) and rep.uv.shape[0] == rep.vertices.shape[0]  # xatlas unwrap
    torch.testing.assert_close(rep.texture(), torch.full((64, 64, 3), 0.7), atol=2e-3, rtol=0)  # grey without colours
    out = rep.render(cameras(2), RenderSettings(32, 32, shading="train"))
    assert out.rgb.shape == (2, 32, 32, 3) and out.opacity.max() == 1 and out.depth.max() > 0
    out.rgb.mean().backward()
    assert rep.texture_logits.grad is not None and float(rep.texture_logits.grad.abs().sum()) > 0
    assert not rep.vertices.requires_grad
    groups = rep.param_groups()
    assert [g["name"] for g in groups] == ["texture"] and groups[0]["lr"] == 0.05
    # shading modes with normals (what the trainer asks for lambertian / textureless / normal)
    lit = rep.render(cameras(2), RenderSettings(32, 32, shading="textureless", need_normals=True, training=False))
    assert lit.normal is not None and lit.normal.shape == (2, 32, 32, 3)
    assert not torch.allclose(lit.rgb, out.rgb.detach())


def test_refine_with_the_oracle_pulls_the_texture_to_the_scene(tmp_path):
    """A grey sphere refined against the oracle of the red/blue sphere (guidance scale 1): the
    renders get closer to the exact ones."""
    grey, scene = sphere_files(tmp_path)
    steps = 30
    rep, ctx = build({"name": "textured-mesh", "mesh": str(grey), "texture_size": 32, "background": {"kind": "solid"}}, tmp_path, scene, steps)
    guidance = build_plugin("guidance", {"name": "refine", "guidance_scale": 1.0, "prior": {"name": "oracle", "noise_std": 0.1}}, ctx, "guidance.0")
    reference = guidance.prior.scene
    eval_cams = cameras(4)

    def error():
        with torch.no_grad():
            out = rep.render(eval_cams, RenderSettings(32, 32, background="solid", training=False))
            ref = reference.render(eval_cams, 32, 32, background=out.background)
        return float(((out.rgb - ref.rgb) ** 2).mean())

    before = error()
    optimizer = torch.optim.Adam([rep.texture_logits], lr=0.2)
    torch.manual_seed(0)
    for step in range(steps):
        cams = make_cameras(torch.rand(2) * 60 - 30, torch.rand(2) * 360, torch.full((2,), 3.2), torch.full((2,), 40.0))
        out = rep.render(cams, RenderSettings(32, 32))
        loss = sum(guidance(out, cams, step).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = error()
    assert after < 0.05 * before, (before, after)  # measured: 0.090 -> 0.0012


def test_denoised_target_is_the_scene_at_scale_1_and_strength_matters(tmp_path):
    _, scene = sphere_files(tmp_path)
    rep, ctx = build({"name": "textured-mesh", "mesh": str(scene), "texture_size": 64, "background": {"kind": "solid"}}, tmp_path, scene)
    spec = {"name": "refine", "guidance_scale": 1.0, "strength": 0.1, "prior": {"name": "oracle", "noise_std": 0.0}}
    guidance = build_plugin("guidance", spec, ctx, "guidance.0")
    cams = cameras(2)
    out = rep.render(cams, RenderSettings(32, 32, background="solid", training=False))
    ref = guidance.prior.scene.render(cams, 32, 32, background=out.background)
    target = guidance.denoised(out, cams, 0)
    # noise_std 0: the oracle's posterior mean is the exact view, whatever the noise
    torch.testing.assert_close(target.permute(0, 2, 3, 1), ref.rgb, atol=1e-4, rtol=0)
    assert ddim_timesteps(1000, 50, 200) == list(range(200, -1, -20))
    assert ddim_timesteps(1000, 50, 5) == [0]
    with pytest.raises(ConfigError, match=r"strength: values must lie in \(0, 1\]"):
        build_plugin("guidance", {**spec, "strength": 1.5}, ctx, "guidance.0")


def test_checkpoint_round_trip_and_export(tmp_path):
    import trimesh

    grey, _ = sphere_files(tmp_path)
    rep, _ = build({"name": "textured-mesh", "mesh": str(grey), "texture_size": 32}, tmp_path)
    with torch.no_grad():
        rep.texture_logits.add_(torch.randn_like(rep.texture_logits))
    state = rep.state_dict()
    assert {"vertices", "faces", "uv", "normals", "texture_logits"} <= set(state)
    fresh, _ = build({"name": "textured-mesh", "texture_size": 32}, tmp_path)  # no surface until loaded
    fresh.load_state_dict(state)
    settings = RenderSettings(24, 24, background="solid", training=False)
    assert torch.equal(rep.render(cameras(2), settings).rgb, fresh.render(cameras(2), settings).rgb)
    files = fresh.export("glb", tmp_path / "mesh.glb")
    loaded = trimesh.load(files[0], force="mesh")
    assert len(loaded.faces) == rep.faces.shape[0] and loaded.visual.material.baseColorTexture is not None
    mesh, _ = fresh.export_mesh(texture_size=16)
    assert mesh.texture.shape == (16, 16, 3)


def test_bad_input_is_a_clear_error(tmp_path):
    import trimesh

    rep, _ = build({"name": "textured-mesh"}, tmp_path)
    with pytest.raises(UserError, match="no surface to texture: set representation.mesh .* or seed it from a finished run"):
        rep.param_groups()
    with pytest.raises(UserError, match="no surface to texture"):
        rep.render(cameras(1), RenderSettings(16, 16))
    points = tmp_path / "points.ply"
    trimesh.PointCloud(np.random.rand(20, 3)).export(points)
    with pytest.raises(UserError, match="no faces|holds no triangle mesh"):
        build({"name": "textured-mesh", "mesh": str(points)}, tmp_path)
    with pytest.raises(UserError, match="cannot be initialised from a object run"):
        rep.initialize_from(object())


def test_seeded_from_a_gaussians_run(tmp_path):
    """Gaussians provide a surface mesh with a baked texture: it becomes the fixed mesh."""
    g, _ = build({"name": "gaussians", "num_points": 400}, tmp_path)
    with torch.no_grad():  # a red ball of opaque Gaussians
        d = torch.nn.functional.normalize(torch.randn(400, 3), dim=-1)
        g.means.copy_(d * 0.4)
        g.log_scales.fill_(np.log(0.06))
        g.opacity_logits.fill_(3.0)
        g.sh_dc.copy_(torch.tensor([1.5, -1.5, -1.5]).expand(400, 1, 3))
    rep, _ = build({"name": "textured-mesh", "texture_size": 64, "source_resolution": 32, "source_faces": 500}, tmp_path)
    done = rep.initialize_from(g)
    assert 0 < done["faces"] <= 500 and done["texture"] == 64
    tex = rep.texture().detach()
    assert float(tex[..., 0].mean()) > 0.6 and float(tex[..., 2].mean()) < 0.3  # red
    assert 0.3 < float(rep.vertices.norm(dim=-1).mean()) < 0.6


def test_dreamgaussian_pipelines_end_with_the_texture_stage():
    for name, prior in (("dreamgaussian", "zero123"), ("dreamgaussian-text", "stable-diffusion")):
        values = {"reference_view.image": "photo.png"} if name == "dreamgaussian" else {"prompt": "a cat"}
        stages = load_pipeline(name, None, values).stages
        assert [s.recipe.representation["name"] for s in stages] == ["gaussians", "textured-mesh"]
        assert stages[1].init_from == "gaussians" and stages[1].recipe.trainer.export == ["glb"] and stages[0].recipe.trainer.export == []
        refine = stages[1].recipe.guidance[0]
        assert refine["name"] == "refine" and stages[1].recipe.priors[refine["prior"]]["name"] == prior
        assert stages[1].recipe.trainer.steps == 50


TINY = [
    "trainer.steps=3", "trainer.resolution=32", "trainer.eval_resolution=32", "trainer.eval_views=2", "trainer.video_frames=2",
    "trainer.video_resolution=16", "trainer.log_every=1", "trainer.checkpoint_every=3",
    "gaussians:representation.num_points=300", "gaussians:representation.init_opacity=0.5",
    "mesh:representation.texture_size=64", "mesh:representation.source_resolution=32", "mesh:representation.source_faces=2000",
    "mesh:trainer.export_texture_size=64",
]


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "distill3d.engine.cli", *args], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_demo_gaussians_then_texture_and_glb_export(tmp_path):
    import json

    import trimesh

    out = tmp_path / "demo"
    code, _, err = cli("demo", "--stages", "gaussians,mesh", "--out", str(out), "--quiet", *sum((["--set", s] for s in TINY), []))
    assert code == 0, err
    assert (out / "mesh" / "mesh.glb").exists()
    mesh_eval = json.loads((out / "mesh" / "eval.json").read_text())["mesh"]
    assert mesh_eval["textured"] and "chamfer_l1_over_diagonal" in mesh_eval
    code, _, err = cli("export", str(out), "--format", "glb", "--out", str(tmp_path / "again.glb"))
    assert code == 0, err
    loaded = trimesh.load(tmp_path / "again.glb", force="mesh")
    assert len(loaded.faces) > 0 and loaded.visual.material.baseColorTexture.size == (64, 64)


@pytest.mark.parametrize("kind", ["stable-diffusion", "zero123"])
def test_refine_decodes_through_a_vae_prior(kind, tmp_path, monkeypatch):
    """Latent priors (tiny random-weight SD / Zero123): the target is decoded by their VAE and
    compared with the render at the render's size; the loss reaches the render."""
    from distill3d.plugins.contract import check_guidance

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if kind == "stable-diffusion":
        from tiny_models import build_tiny_sd

        prior = {"name": kind, "model": str(build_tiny_sd(tmp_path / "sd")), "local_files_only": True}
        ctx = {}
    else:
        from test_plugin_contracts import _reference_view
        from tiny_zero123 import build_tiny_zero123

        prior = {"name": kind, "model": str(build_tiny_zero123(tmp_path / "z")), "local_files_only": True, "image_size": 32}
        ctx = {"reference_view": _reference_view()}
    check_guidance("refine", {"prior": prior, "guidance_scale": 3.0, "ddim_steps": 10}, tmp_path, size=16, **ctx)


def test_a_texture_run_stopped_before_its_first_checkpoint_resumes_seeded(tmp_path):
    """No checkpoint yet: resume starts the stage again from its init_from source (not from an
    empty surface)."""
    from distill3d.engine.trainer import Trainer

    values = {"scene": "default"}
    stages = load_pipeline("oracle-gaussians-mesh", [s for s in TINY if not s.startswith("trainer.steps")] + ["trainer.steps=2"], values).stages
    gaussians, mesh = tmp_path / "gaussians", tmp_path / "mesh"
    Trainer.create(stages[0].recipe, gaussians, quiet=True).fit()
    stages[1].recipe.init_from = str(gaussians)
    trainer = Trainer.create(stages[1].recipe, mesh, quiet=True)
    faces = int(trainer.representation.faces.shape[0])
    trainer.close()  # stopped before any step
    resumed = Trainer.resume(mesh, quiet=True)
    assert int(resumed.representation.faces.shape[0]) == faces > 0
    resumed.fit()
    assert (mesh / "mesh.glb").exists()


def test_dreamgaussian_image_pipeline_with_a_tiny_zero123(tmp_path):
    """Both DreamGaussian stages from one image: Gaussians (Zero123 SDS + reference losses), then
    the texture refined against tiny-Zero123 denoised renders plus the input view's RGB."""
    import json

    import imageio.v3 as iio

    from tiny_zero123 import build_tiny_zero123

    image = np.zeros((48, 48, 4), np.uint8)
    image[12:36, 14:34] = [230, 120, 30, 255]
    iio.imwrite(tmp_path / "photo.png", image)
    model = build_tiny_zero123(tmp_path / "z123")
    small = [
        "trainer.resolution=16", "trainer.eval_resolution=16", "trainer.eval_views=2", "trainer.video_frames=2",
        "trainer.video_resolution=16", "trainer.log_every=1", "reference_view.size=32", "guidance.1.resolution=16",
        "gaussians:representation.num_points=300", "gaussians:representation.init_opacity=0.5",
        "mesh:representation.texture_size=64", "mesh:representation.source_resolution=32", "mesh:representation.source_faces=2000",
        "mesh:trainer.export_texture_size=64",
    ]
    out = tmp_path / "dg"
    code, _, err = cli("generate", "--image", str(tmp_path / "photo.png"), "--recipe", "dreamgaussian", "--model", str(model),
                       "--steps", "2", "--out", str(out), "--quiet", *sum((["--set", s] for s in small), []))
    assert code == 0, err
    last = [json.loads(line) for line in (out / "mesh" / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"refine", "ref_rgb"} <= set(last)
    assert (out / "mesh" / "mesh.glb").exists() and not (out / "gaussians" / "mesh.glb").exists()
