"""Scheduled scalars: one implementation for every value that changes over training.

A schedule in a recipe is either a number (constant) or a mapping:
  {"linear": [[step, value], ...]}     piecewise-linear between the points, clamped outside
  {"piecewise": [[step, value], ...]}  step function: value of the last point at or before step
  {"exponential": [[step, value], ...]} log-linear between the points (values > 0), clamped outside:
                                       learning-rate decay such as Gaussian positions 1e-3 -> 2e-5
Steps are integers or strings like "30%" (a fraction of the run's total steps).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Union

from distill3d.engine.errors import UserError

ScheduleSpec = Union[float, int, dict]


KINDS = ("linear", "piecewise", "exponential")


class ScheduleError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class Schedule:
    kind: str  # "constant" | "linear" | "piecewise" | "exponential"
    points: tuple[tuple[float, float], ...]  # (step, value), steps may be fractions if relative

    @staticmethod
    def parse(spec: ScheduleSpec, name: str = "schedule") -> "Schedule":
        if isinstance(spec, Schedule):
            return spec
        if isinstance(spec, bool):
            raise ScheduleError(f"{name}: expected a number or a schedule mapping, got {spec!r}")
        if isinstance(spec, (int, float)):
            if not math.isfinite(spec):
                raise ScheduleError(f"{name}: expected a finite number, got {spec!r}")
            return Schedule("constant", ((0, float(spec)),))
        if isinstance(spec, dict) and len(spec) == 1:
            (kind, pts), = spec.items()
            if kind not in KINDS:
                raise ScheduleError(f"{name}: unknown schedule kind {kind!r}; use one of {', '.join(KINDS)}")
            if not isinstance(pts, (list, tuple)) or not pts:
                raise ScheduleError(f"{name}: {kind} needs a non-empty list of [step, value] points")
            parsed = []
            for p in pts:
                if not isinstance(p, (list, tuple)) or len(p) != 2:
                    raise ScheduleError(f"{name}: each point must be [step, value], got {p!r}")
                if isinstance(p[1], bool) or not isinstance(p[1], (int, float)) or not math.isfinite(p[1]):
                    raise ScheduleError(f"{name}: the value of point {p!r} must be a finite number")
                if kind == "exponential" and p[1] <= 0:
                    raise ScheduleError(f"{name}: exponential schedule values must be positive, got {p[1]!r}")
                parsed.append((p[0], float(p[1])))
            return Schedule(kind, tuple(parsed))
        raise ScheduleError(f"{name}: expected a number or {{'linear'|'piecewise'|'exponential': [[step, value], ...]}}, got {spec!r}")

    def resolve(self, total_steps: int) -> "Schedule":
        """Turn "30%" steps into absolute ones and check the points are ordered."""
        pts = []
        for step, value in self.points:
            if isinstance(step, str):
                if not step.endswith("%"):
                    raise ScheduleError(f"step {step!r} must be an integer or a percentage like '30%'")
                step = float(step[:-1]) / 100.0 * total_steps
            pts.append((float(step), value))
        if any(b[0] < a[0] for a, b in zip(pts, pts[1:])):
            raise ScheduleError(f"schedule steps must be non-decreasing: {[p[0] for p in pts]}")
        return Schedule(self.kind, tuple(pts))

    def __call__(self, step: float) -> float:
        pts = self.points
        if self.kind == "constant" or len(pts) == 1:
            return pts[0][1]
        steps = [p[0] for p in pts]
        if self.kind == "piecewise":
            i = bisect.bisect_right(steps, step) - 1
            return pts[max(i, 0)][1]
        if step <= steps[0]:
            return pts[0][1]
        if step >= steps[-1]:
            return pts[-1][1]
        i = bisect.bisect_right(steps, step) - 1
        (s0, v0), (s1, v1) = pts[i], pts[i + 1]
        if s1 == s0:
            return v0
        f = (step - s0) / (s1 - s0)
        if self.kind == "exponential":
            return math.exp(math.log(v0) + (math.log(v1) - math.log(v0)) * f)
        return v0 + (v1 - v0) * f


def schedule_value(spec: ScheduleSpec, step: int, total_steps: int, name: str = "schedule") -> float:
    return Schedule.parse(spec, name).resolve(total_steps)(step)
