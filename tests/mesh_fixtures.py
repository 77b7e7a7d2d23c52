"""Mesh files the tests (and benchmarks/bench_mesh_pipeline.py) make themselves, and the optional
Khronos glTF validator.

Kept outside the test modules so the benchmark can build the very same textured reference.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from distill3d.representations.mesh.mesh_io import save_mesh
from distill3d.representations.mesh.texture_bake import textured_mesh


def _pattern(points: torch.Tensor) -> torch.Tensor:
    """A smooth procedural albedo: colour bands that change along all three axes."""
    x, y, z = points.unbind(-1)
    r = 0.55 + 0.35 * torch.sin(3.0 * x + 1.0)
    g = 0.45 + 0.35 * torch.cos(2.5 * y - 0.5 * z)
    b = 0.5 + 0.3 * torch.sin(2.0 * z + 1.5 * x)
    return torch.stack([r, g, b], dim=-1).clamp(0.0, 1.0)


def make_textured_reference(path: str | os.PathLike, texture_size: int = 256) -> Path:
    """A textured mesh file (GLB, OBJ or PLY by suffix): a box with a sphere resting on it, UV
    unwrapped by xatlas, albedo baked from a procedural pattern. About 1 unit tall."""
    import trimesh

    box = trimesh.creation.box(extents=(1.1, 0.5, 0.7))
    box.apply_translation((0.0, -0.3, 0.0))
    ball = trimesh.creation.icosphere(subdivisions=3, radius=0.38)
    ball.apply_translation((0.15, 0.3, 0.05))
    both = trimesh.util.concatenate([box, ball])
    verts = torch.tensor(both.vertices, dtype=torch.float32)
    faces = torch.tensor(both.faces, dtype=torch.int64)
    mesh, _ = textured_mesh(verts, faces, _pattern, min_component_fraction=0.0, texture_size=texture_size, vertex_colors=False)
    path = Path(path)
    save_mesh(mesh, path)
    return path


def gltf_validator() -> tuple[str, str] | None:
    """(node, node_modules folder) when the npm `gltf-validator` is installed. ./dev.sh installs it
    under .venv/gltf-validator and sets DISTILL3D_GLTF_VALIDATOR to that folder; pytest run
    directly (not through ./dev.sh) finds the same folder next to the interpreter's venv."""
    root = os.environ.get("DISTILL3D_GLTF_VALIDATOR") or str(Path(sys.prefix) / "gltf-validator")
    node = shutil.which("node")
    if not root or not node or not os.path.isdir(os.path.join(root, "node_modules", "gltf-validator")):
        return None
    return node, os.path.join(root, "node_modules")


_VALIDATE_JS = (
    "const fs=require('fs');const v=require('gltf-validator');"
    "v.validateBytes(new Uint8Array(fs.readFileSync(process.argv[2]))).then(r=>{"
    "console.log(JSON.stringify({errors:r.issues.numErrors,warnings:r.issues.numWarnings,"
    "messages:r.issues.messages.map(m=>m.code+' '+m.message)}))}).catch(e=>{console.error(e);process.exit(2)});"
)


def validate_gltf(path: str | os.PathLike) -> dict | None:
    """The validator's report {errors, warnings, messages} for a GLB, or None when it is not installed."""
    found = gltf_validator()
    if found is None:
        return None
    node, modules = found
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "validate.js"
        script.write_text(_VALIDATE_JS)
        res = subprocess.run(
            [node, str(script), str(path)], capture_output=True, text=True, env={**os.environ, "NODE_PATH": modules}, timeout=120
        )
    if res.returncode != 0:
        raise RuntimeError(f"gltf-validator failed on {path}: {res.stderr}")
    return json.loads(res.stdout)


SKIP_NO_VALIDATOR = "gltf-validator not installed (./dev.sh test installs it from npm when node is present)"
