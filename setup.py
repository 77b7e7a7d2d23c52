"""Package discovery for setuptools (everything else is in pyproject.toml).

The four source folders at the repository root install under one import name, distill3d.<folder>
(pyproject cannot prefix discovered names, so this file does it). Every package below them is
found automatically: a new sub-package needs no edit here. Folders without __init__.py that hold
data (engine/recipes, engine/scenes) are listed as data packages so setuptools ships their files
(package-data in pyproject) without warnings; the example plugins are separate distributions and
are left out.
"""

from setuptools import find_namespace_packages, setup

ROOTS = ("engine", "guidance", "representations", "plugins")
SKIP = ["*__pycache__*", "example*"]

setup(
    package_dir={f"distill3d.{root}": root for root in ROOTS},
    packages=[f"distill3d.{root}" + (f".{sub}" if sub else "") for root in ROOTS
              for sub in ["", *find_namespace_packages(root, exclude=SKIP)]],
)
