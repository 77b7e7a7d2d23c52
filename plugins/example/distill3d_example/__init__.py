"""Example plugin: a guidance that keeps the object's screen coverage near a target.

A guidance is a class with a `Config` dataclass, constructed as Cls(config, ctx), whose forward
takes (render output, cameras, step) and returns named, weighted loss terms. Registering it is
one entry point in this package's pyproject.toml:

    [project.entry-points."distill3d.guidance"]
    coverage-target = "distill3d_example:CoverageTargetGuidance"

After `pip install ./plugins/example`, recipes can use it:

    guidance:
      - {name: coverage-target, target: 0.3, weight: 10.0}
"""

from __future__ import annotations

from dataclasses import dataclass

from distill3d.engine.interfaces import Guidance


@dataclass
class CoverageTargetConfig:
    target: float = 0.3  # wanted mean opacity over the image
    weight: float = 1.0


class CoverageTargetGuidance(Guidance):
    Config = CoverageTargetConfig

    def __init__(self, config: CoverageTargetConfig, ctx):
        super().__init__(config, ctx)
        if not 0.0 <= config.target <= 1.0:
            raise ValueError(f"coverage-target: target must be in [0, 1], got {config.target}")

    def forward(self, out, cameras, step):
        coverage = out.opacity.mean()
        return {"coverage": self.config.weight * (coverage - self.config.target) ** 2}
