"""Oracle image-to-3D: one input image -> NeRF, scored against the exact scene.

For each scene: render it once from the input camera (elevation --elevation, azimuth 0, the
recipe's distance and fovy) into an RGBA image, then run the `oracle-zero123` recipe from that
image alone (reference-view losses + the oracle Zero123, which answers from the scene given only
the camera vector relative to the input view), and print PSNR / mask IoU over the recipe's 8
evaluation views (elevation 15, evenly spaced azimuths: most of them unseen in the input) and the
wall time. What `distill3d demo --image-to-3d` does, without the CLI.

    python benchmarks/bench_zero123_oracle.py                         # default scene and two_cylinders
    python benchmarks/bench_zero123_oracle.py --scene my.json --elevation 20 --set trainer.steps=600
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_description  # noqa: E402


def render_input_image(scene: str, path: Path, elevation: float, distance: float, fovy: float, size: int = 256) -> Path:
    """The scene from the input camera as straight-alpha RGBA (what a user's cut-out photo is)."""
    import imageio.v3 as iio
    import numpy as np

    from distill3d.engine.cameras import make_cameras
    from distill3d.engine.references import load_reference

    out = load_reference(scene).render(make_cameras(elevation, 0.0, distance, fovy), size, size, background=torch.zeros(1, size, size, 3))
    alpha = out.opacity[0]
    rgb = torch.where(alpha > 0, out.rgb[0] / alpha.clamp_min(1e-6), out.rgb[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, (torch.cat([rgb, alpha], -1).clamp(0, 1).numpy() * 255 + 0.5).astype(np.uint8))
    return path


def run(scene: str, out: Path, elevation: float, overrides: list[str]) -> dict:
    """What `distill3d demo --image-to-3d --scene SCENE --elevation E` runs, with the figures returned."""
    from distill3d.engine.config import load_yaml
    from distill3d.engine.pipeline import load_pipeline, run_pipeline
    from distill3d.engine.recipe import recipe_path
    from distill3d.engine.reference_scene import resolve_scene_path

    scene_path = resolve_scene_path(Path(scene)).resolve()
    view = load_yaml(recipe_path("oracle-zero123"))["reference_view"]
    image = render_input_image(str(scene_path), out / "input.png", elevation, view["distance"], view["fovy"], view["size"])
    values = {"scene": str(scene_path), "reference_view.image": str(image.resolve()), "reference_view.elevation": elevation}
    pipeline = load_pipeline("oracle-zero123", overrides, values)
    results = []
    start = time.perf_counter()
    run_pipeline(pipeline, out / "run", lambda trainer: results.append(trainer.fit()) or results[-1], quiet=True)
    seconds = time.perf_counter() - start
    result = results[-1]
    return {
        "scene": str(scene_path),
        "psnr": round(result.eval["psnr"], 2),
        "mask_iou": round(result.eval["mask_iou"], 4),
        "per_view_psnr": [round(v["psnr"], 1) for v in result.eval["per_view"]],
        "seconds": round(seconds, 1),
        "steps": pipeline.stages[0].recipe.trainer.steps,
        "run_dir": str(out / "run"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scene", action="append", help="scene file or shipped name (repeatable); default: default, two_cylinders")
    parser.add_argument("--elevation", type=float, default=0.0, help="elevation of the input view (degrees)")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", help="recipe override key=value")
    args = parser.parse_args()
    from distill3d.engine.reference_scene import DEFAULT_SCENE

    scenes = args.scene or [str(DEFAULT_SCENE), "two_cylinders"]
    print(machine_description("cpu"), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for i, scene in enumerate(scenes):
            print(json.dumps(run(scene, root / f"scene{i}", args.elevation, args.overrides)), flush=True)
    print("after: " + machine_description("cpu"), flush=True)


if __name__ == "__main__":
    main()
