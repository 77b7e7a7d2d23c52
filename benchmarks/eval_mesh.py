"""Score an exported mesh file against a run's reference scene.

    python benchmarks/eval_mesh.py RUN_DIR [--mesh RUN_DIR/mesh.glb]

Loads the file back (as a user's tool would), renders it with the rasterizer from the run's 8
evaluation views against exact renders (PSNR on white, mask IoU), and measures Chamfer-L1 between
points on the mesh and exact surface points of the reference (ray hits from 64 views at 96x96),
as a fraction of the reference's bounding-box diagonal, and the normal angular error (angle between
the mesh's face normals and the exact surface normal at 20k surface samples; analytic scenes: the
gradient of their exact SDF, meshes: the reference's face normals). Works for scene and mesh references.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine_description  # noqa: E402

from distill3d.engine.cameras import CameraSampler  # noqa: E402
from distill3d.engine.evaluation import evaluate_mesh as evaluate_mesh_object  # noqa: E402
from distill3d.engine.recipe import resolve_recipe  # noqa: E402
from distill3d.engine.references import load_reference  # noqa: E402
from distill3d.representations.mesh.mesh_io import load_mesh  # noqa: E402


@torch.no_grad()
def evaluate_mesh(run_dir: Path, mesh_path: Path | None = None, reference=None) -> dict:
    """PSNR / mask IoU of the reloaded mesh file over the run's eval views, Chamfer-L1 against
    the exact reference surface (also over the reference's bounding-box diagonal) and the normal
    angular error (median / mean / p90 degrees, 20k samples; engine/surface_metrics.py)."""
    import yaml

    recipe = resolve_recipe(yaml.safe_load((run_dir / "config.yaml").read_text()))
    reference = reference if reference is not None else load_reference(recipe.scene)
    mesh_path = mesh_path or run_dir / "mesh.glb"
    mesh = load_mesh(mesh_path)
    result = {"mesh": str(mesh_path)}
    result.update(evaluate_mesh_object(mesh, reference, CameraSampler(recipe.cameras), recipe.trainer.eval_views, recipe.trainer.eval_resolution))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--mesh", type=Path, default=None)
    args = parser.parse_args()
    result = evaluate_mesh(args.run_dir, args.mesh)
    print(f"machine: {machine_description()}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
