"""Reference objects with exact renders: what the oracle imitates and what runs are scored against.

A reference is anything with `render(cameras, height, width, background=None) -> RenderOutput`.
Scene files (.json/.yaml) hold analytic primitives (distill3d.engine.reference_scene).
"""

from __future__ import annotations

from pathlib import Path

from distill3d.engine.errors import UserError

SCENE_SUFFIXES = (".json", ".yaml", ".yml")


def load_reference(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise UserError(f"reference file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in SCENE_SUFFIXES:
        from distill3d.engine.reference_scene import load_scene

        return load_scene(path)
    raise UserError(f"{path}: unsupported reference type {suffix!r}; use a scene file ({', '.join(SCENE_SUFFIXES)})")
