"""Reference objects with exact renders: what the oracle imitates and what runs are scored against.

A reference is anything with `render(cameras, height, width, background=None) -> RenderOutput`.
Scene files (.json/.yaml) hold analytic primitives (distill3d.engine.reference_scene); mesh files
(.obj/.glb/.gltf/.ply, textured or vertex-coloured) are fitted inside the unit sphere and rendered
exactly by the rasterizer (distill3d.representations.mesh.render.MeshReference).
"""

from __future__ import annotations

from pathlib import Path

from distill3d.engine.errors import UserError

SCENE_SUFFIXES = (".json", ".yaml", ".yml")
MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply")


def load_reference(path: str | Path):
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in SCENE_SUFFIXES or suffix == "":
        from distill3d.engine.reference_scene import load_scene

        return load_scene(path)  # a scene file, or a shipped scene by name ("two_cylinders")
    if not path.exists():
        raise UserError(f"reference file {path} does not exist")
    if suffix in MESH_SUFFIXES:
        from distill3d.representations.mesh.render import MeshReference

        return MeshReference.from_file(path)  # MeshLoadError is a UserError: the CLI prints it as is
    raise UserError(
        f"{path}: unsupported reference type {suffix!r}; use a scene file ({', '.join(SCENE_SUFFIXES)}) "
        f"or a mesh ({', '.join(MESH_SUFFIXES)})"
    )
