"""The Janus benchmark: how often does each guidance method paint the front onto the back?

    python benchmarks/bench_janus.py [--quick] [--scene janus_face] [--seeds 0 1 2] [--steps N]
                                     [--json FILE] [--gif FILE] [--out DIR] [--jobs N]

Every method distils the same scene (default ``janus_face``: a head with a face on +z and a green
block on its back) into the same hash-grid NeRF with the same seeds, steps and cameras, guided by
the view-biased oracle (guidance/priors/biased_oracle.py), whose plain-prompt data distribution is
front-biased like a real text-to-image model:

    sds-plain         SDS, plain prompt (no view words)
    sds-view          SDS with view-dependent prompts ("<prompt>, back view" ...)
    perp-neg-sd       Perp-Neg, the Perp-Neg authors' (stable-dreamfusion) negative weights
    perp-neg-ts       Perp-Neg, threestudio's negative weights
    oracle-zero123    image-to-3D from one exact front render (elevation 0) with the reference-view
                      losses and the oracle Zero123 prior (recipe oracle-zero123), skipped with a
                      note where that prior is not registered

Per method (mean over seeds): PSNR and mask IoU against exact renders over all evaluation views
(evenly spaced azimuths at elevation 15) and over the back half (|azimuth| > 90), and the Janus
rate: the fraction of back-half views whose render is closer (MSE) to the canonical front render
(azimuth 0, same elevation and distance) than to the true view, and its graded form: the mean
over back-half views of MSE(render, front) / MSE(render, truth) (below 1: a front painted on the
back; near 1: a ghost halfway between; large: the true back). Prints the machine, a table and
writes a JSON file; ``--gif`` writes a turntable strip (reference and every method side by side,
seed 0). Guidance scale 1 (diffusers convention) for every method: the only scale at which an
oracle's fixed point is its data mean (oracle.py), so the methods differ by their conditioning only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine_description  # noqa: E402

from distill3d.engine.cameras import make_cameras, orbit_cameras  # noqa: E402
from distill3d.engine.evaluation import mask_iou, psnr  # noqa: E402
from distill3d.engine.interfaces import RenderSettings  # noqa: E402
from distill3d.engine.recipe import load_recipe_data, resolve_recipe  # noqa: E402
from distill3d.engine.references import load_reference  # noqa: E402
from distill3d.engine.reference_scene import resolve_scene_path  # noqa: E402
from distill3d.engine.reference_view import render_input_image  # noqa: E402
from distill3d.engine.trainer import Trainer  # noqa: E402
from distill3d.plugins.registry import Registry  # noqa: E402


@dataclass
class Method:
    name: str
    guidance: str  # guidance plugin
    prior: dict = field(default_factory=dict)  # biased-oracle settings beyond the shared ones
    extra: dict = field(default_factory=dict)  # guidance settings


METHODS = [
    Method("sds-plain", "sds", {"view_dependent_prompts": False}),
    Method("sds-view", "sds", {"view_dependent_prompts": True}),
    Method("perp-neg-sd", "sds-perp-neg", {}, {"perp_neg_weighting": "stable-dreamfusion"}),
    Method("perp-neg-ts", "sds-perp-neg", {}, {"perp_neg_weighting": "threestudio"}),
]
ZERO123 = Method("oracle-zero123", "sds")  # its recipe is oracle-zero123 (zero123_recipe)
TEXT_ELEVATION = [-10, 45]  # text-to-3D's camera range (dreamfusion-sd), for every method


def _base_data(recipe: str, name: str, seed: int, steps: int, resolution: int) -> dict:
    data = load_recipe_data(recipe)
    data["name"] = f"janus-{name}"
    data["seed"] = seed
    data["trainer"].update(steps=steps, resolution=resolution, checkpoint_every=10**9, log_every=10**9)
    data["cameras"]["elevation"] = TEXT_ELEVATION
    return data


def zero123_recipe(scene: str, image: Path, seed: int, steps: int, resolution: int):
    """The shipped oracle image-to-3D recipe on the same steps, resolution and cameras as the
    text methods: reference-view losses on `image` plus the oracle Zero123 prior."""
    data = _base_data("oracle-zero123", ZERO123.name, seed, steps, resolution)
    data["scene"] = scene
    data["reference_view"].update(image=str(image), elevation=0.0)
    for guidance in data["guidance"]:
        if guidance["name"] == "reference":
            guidance["resolution"] = resolution
    return resolve_recipe(data)


def recipe_for(method: Method, scene: str, seed: int, steps: int, resolution: int, prior_overrides: dict):
    data = _base_data("oracle-nerf", method.name, seed, steps, resolution)
    prior = {"name": "biased-oracle", "scene": scene, **method.prior, **prior_overrides}
    data["guidance"] = [
        {"name": method.guidance, "guidance_scale": 1.0, "weighting": "sds", "timesteps": {"t_min": 0.02, "t_max": 0.98}, "prior": prior, **method.extra}
    ]
    return resolve_recipe(data)


@torch.no_grad()
def score(representation, scene, n_views: int, resolution: int, elevation: float = 15.0, distance: float = 3.2, fovy: float = 42.5) -> dict:
    """PSNR / mask IoU over all and back-half views, and the Janus rate (module docstring)."""
    cams = orbit_cameras(n_views, elevation, distance, fovy)
    settings = RenderSettings(resolution, resolution, shading="albedo", background="solid", training=False)
    views = []
    for i in range(n_views):
        cam = cams[i]
        out = representation.render(cam, settings)
        true = scene.render(cam, resolution, resolution, background=out.background)
        front_cam = make_cameras(cam.elevation, torch.zeros(1), cam.distance, cam.fovy)
        front = scene.render(front_cam, resolution, resolution, background=out.background)
        rgb = out.rgb.clamp(0, 1)
        az = float(cam.azimuth[0])
        views.append(
            {
                "azimuth": az,
                "back": abs(az) > 90.0,
                "psnr": psnr(rgb, true.rgb),
                "mask_iou": mask_iou(out.opacity[..., 0] > 0.5, true.opacity[..., 0] > 0.5),
                "mse_true": float(((rgb - true.rgb) ** 2).mean()),
                "mse_front": float(((rgb - front.rgb) ** 2).mean()),
            }
        )
    back = [v for v in views if v["back"]]

    def mean(items, key):
        return sum(v[key] for v in items) / len(items)

    return {
        "psnr": mean(views, "psnr"),
        "mask_iou": mean(views, "mask_iou"),
        "psnr_back": mean(back, "psnr"),
        "mask_iou_back": mean(back, "mask_iou"),
        "janus_rate": sum(v["mse_front"] < v["mse_true"] for v in back) / len(back),
        # graded: how much farther the back renders are from the front than from the truth (< 1: Janus)
        "front_true_ratio_back": sum(v["mse_front"] / max(v["mse_true"], 1e-12) for v in back) / len(back),
        "views": views,
    }


@torch.no_grad()
def turntable(representation, frames: int, resolution: int) -> torch.Tensor:
    cams = orbit_cameras(frames, 15.0, 3.2, 42.5)
    settings = RenderSettings(resolution, resolution, shading="albedo", background="solid", training=False)
    return torch.cat([representation.render(cams[i], settings).rgb.clamp(0, 1) for i in range(frames)])


def run_method(method: Method, scene: str, seed: int, args, root: Path, prior_overrides: dict):
    if method.name == ZERO123.name:
        recipe = zero123_recipe(scene, root / "input.png", seed, args.steps, args.resolution)
    else:
        recipe = recipe_for(method, scene, seed, args.steps, args.resolution, prior_overrides)
    trainer = Trainer(recipe, root / f"{method.name}-seed{seed}", quiet=True)
    trainer.build_optimizer()
    start = time.perf_counter()
    for step in range(recipe.trainer.steps):
        trainer.train_step(step)
        if args.verbose and (step + 1) % 100 == 0:
            print(f"    {method.name} seed {seed}: step {step + 1} ({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    trainer.representation.eval()
    result = score(trainer.representation, load_reference(scene), args.eval_views, args.eval_resolution)
    result["seconds"] = seconds
    frames = turntable(trainer.representation, args.gif_frames, args.gif_resolution) if (args.gif and seed == args.seeds[0]) else None
    return result, frames


SHORT_LABELS = {"sds-plain": "plain", "sds-view": "view", "perp-neg-sd": "PN sd", "perp-neg-ts": "PN ts", "oracle-zero123": "zero123"}


def label_strip(name: str, frames: torch.Tensor) -> torch.Tensor:
    """`frames` (F, H, W, 3) with a white band above holding the column's name."""
    import numpy as np
    from PIL import Image, ImageDraw

    F, H, W, _ = frames.shape
    band = Image.new("RGB", (W, 14), "white")
    ImageDraw.Draw(band).text((2, 1), SHORT_LABELS.get(name, name)[: max(1, W // 6)], fill="black")
    band = torch.from_numpy(np.array(band)).float() / 255
    return torch.cat([band[None].expand(F, -1, -1, -1), frames], dim=1)


def write_gif(path: Path, columns: list[tuple[str, torch.Tensor]], fps: int) -> None:
    """One animated strip, a labelled column per method (turntables in step)."""
    import imageio.v3 as iio

    strip = torch.cat([label_strip(name, frames) for name, frames in columns], dim=2)  # (F, H + 14, W * n, 3)
    images = (strip * 255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, list(images), extension=".gif", duration=1000 / fps, loop=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scene", default="janus_face")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--eval-views", type=int, default=16)
    p.add_argument("--eval-resolution", type=int, default=32)
    p.add_argument("--methods", nargs="+", default=None, help="subset of: " + ", ".join(m.name for m in METHODS + [ZERO123]))
    p.add_argument("--set", dest="prior_set", action="append", default=[], metavar="KEY=VALUE", help="biased-oracle setting, e.g. front_bias=3")
    p.add_argument("--quick", action="store_true", help="one seed (0)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel worker processes (one torch thread each)")
    p.add_argument("--verbose", action="store_true", help="print progress every 100 steps")
    p.add_argument("--json", type=Path, default=HERE / "results" / "janus.json")
    p.add_argument("--gif", type=Path, default=None, help="write the turntable strip here (seed 0 of every method)")
    p.add_argument("--gif-frames", type=int, default=24)
    p.add_argument("--gif-resolution", type=int, default=64)
    p.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
    import yaml

    prior_overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.prior_set)}
    scene = str(resolve_scene_path(args.scene))
    known = [m.name for m in METHODS + [ZERO123]]
    unknown = sorted(set(args.methods or []) - set(known))
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    methods = [m for m in METHODS + [ZERO123] if args.methods is None or m.name in args.methods]
    notes = []
    if ZERO123 in methods and ZERO123.name not in Registry("prior").names():
        methods.remove(ZERO123)
        notes.append(f"{ZERO123.name}: skipped, the prior is not registered in this installation")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"machine: {machine_description()}", flush=True)
    print(f"scene {args.scene}, seeds {args.seeds}, {args.steps} steps at {args.resolution}px, prior overrides {prior_overrides or 'none'}", flush=True)
    root = args.out or Path(tempfile.mkdtemp(prefix="distill3d-janus-"))
    if ZERO123 in methods:  # the image-to-3D input: one exact front render, as `demo --image-to-3d`
        root.mkdir(parents=True, exist_ok=True)
        render_input_image(scene, root / "input.png", load_recipe_data(ZERO123.name)["reference_view"], elevation=0.0)
    results, gif_columns = {}, []
    if args.gif:
        ref = load_reference(scene)
        cams = orbit_cameras(args.gif_frames, 15.0, 3.2, 42.5)
        gif_columns.append(("reference", torch.cat([ref.render(cams[i], args.gif_resolution, args.gif_resolution).rgb for i in range(args.gif_frames)])))
    tasks = [(method, seed) for method in methods for seed in args.seeds]
    if args.jobs > 1:  # independent runs in worker processes, one torch thread each
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            futures = {(m.name, seed): pool.submit(run_method, m, scene, seed, args, root, prior_overrides) for m, seed in tasks}
            done = {key: future.result() for key, future in futures.items()}
    else:
        done = {(m.name, seed): run_method(m, scene, seed, args, root, prior_overrides) for m, seed in tasks}
    for method in methods:
        per_seed = []
        for seed in args.seeds:
            r, frames = done[(method.name, seed)]
            per_seed.append(r)
            if frames is not None:
                gif_columns.append((method.name, frames))
            print(f"  {method.name} seed {seed}: janus {r['janus_rate']:.2f}, PSNR {r['psnr']:.2f} (back {r['psnr_back']:.2f}), {r['seconds']:.0f} s", flush=True)
        keys = ("psnr", "mask_iou", "psnr_back", "mask_iou_back", "janus_rate", "front_true_ratio_back", "seconds")
        results[method.name] = {k: sum(r[k] for r in per_seed) / len(per_seed) for k in keys}
        results[method.name]["per_seed"] = per_seed
    print()
    print("| method | PSNR all | IoU all | PSNR back | IoU back | Janus rate | MSE front:true, back | s/run |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['psnr']:.2f} | {r['mask_iou']:.3f} | {r['psnr_back']:.2f} | {r['mask_iou_back']:.3f} | {r['janus_rate']:.2f} | {r['front_true_ratio_back']:.2f} | {r['seconds']:.0f} |")
    for note in notes:
        print(f"note: {note}")
    payload = {
        "machine": machine_description(),
        "scene": args.scene,
        "seeds": args.seeds,
        "steps": args.steps,
        "resolution": args.resolution,
        "prior_overrides": prior_overrides,
        "notes": notes,
        "methods": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.json}")
    if args.gif:
        write_gif(args.gif, gif_columns, fps=8)
        print(f"wrote {args.gif} (columns: {', '.join(n for n, _ in gif_columns)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
