"""Packaging: sub-packages and data folders are found automatically (a new sub-package needs no
edit of pyproject.toml), the wheel carries the recipes and scenes, and building prints no
setuptools warnings."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("engine", "guidance", "representations", "plugins")


def test_wheel_finds_new_subpackages_and_ships_data(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for root in ROOTS:
        shutil.copytree(REPO / root, src / root, ignore=shutil.ignore_patterns("__pycache__"))
    (src / "representations" / "newkind").mkdir()
    (src / "representations" / "newkind" / "__init__.py").write_text('"""A sub-package added without touching pyproject."""\n')
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    for noise in ("Package would be ignored", "is absent from the `packages` configuration", "project.license` as a TOML table"):
        assert noise not in log, noise
    (wheel,) = (tmp_path / "dist").glob("distill3d-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "distill3d/representations/newkind/__init__.py" in names
    for root in ROOTS:  # every package folder of the source tree is in the wheel
        for init in (REPO / root).rglob("__init__.py"):
            rel = init.relative_to(REPO)
            if rel.parts[1].startswith("example"):
                continue
            assert f"distill3d/{rel.as_posix()}" in names, rel
    recipes = {p.name for p in (REPO / "engine" / "recipes").glob("*.yaml")}
    scenes = {p.name for p in (REPO / "engine" / "scenes").glob("*.json")}
    assert {f"distill3d/engine/recipes/{r}" for r in recipes} <= names
    assert {f"distill3d/engine/scenes/{s}" for s in scenes} <= names
    assert not any("example" in n and n.startswith("distill3d/plugins/") for n in names)  # separate distributions

    # Installed from the wheel (not the editable tree), the shipped recipes and scenes are found.
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import distill3d.engine.recipe as r; from distill3d.engine.reference_scene import builtin_scenes; "
            "print(r.__file__); print(' '.join(r.available_recipes())); print(' '.join(builtin_scenes()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120).stdout.splitlines()
    assert out[0].startswith(str(target))
    assert set(out[1].split()) == {r[:-5] for r in recipes}
    assert set(out[2].split()) == {s[:-5] for s in scenes}
