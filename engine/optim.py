"""The optimiser the trainer builds from what the plugins declare, and the hooks plugins get.

Representations (and guidance or priors with trainable parts) declare named parameter groups:
``{"name": ..., "params": [...], "lr": ScheduleSpec, **adam_options}``. The learning rate of each
group is a schedule (a number, ``{linear: ...}``, ``{piecewise: ...}``, ``{exponential: ...}``)
evaluated every step and multiplied by ``trainer.lr_scale``: the optimizer state of a checkpoint
never decides a learning rate, so ``resume --set`` of an lr setting takes effect.

Representations whose parameter count changes (Gaussian densify / prune) replace parameters
through :class:`OptimizerHooks`, which keeps the Adam moments of the rows that survive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distill3d.engine.config import ConfigError
from distill3d.engine.schedules import Schedule


@dataclass
class ScheduledGroup:
    name: str
    lr: Schedule


def build_optimizer(
    groups: list[dict], total_steps: int, betas: tuple[float, float], lr_scale: float
) -> tuple[torch.optim.Adam, list[ScheduledGroup]]:
    """Adam over the declared groups; returns it with each group's resolved lr schedule."""
    seen: set[str] = set()
    params_seen: set[int] = set()
    adam_groups, schedules = [], []
    for i, group in enumerate(groups):
        group = dict(group)
        name = str(group.pop("name", f"group{i}"))
        if name in seen:
            raise ConfigError(f"parameter group name {name!r} is declared twice; group names must be unique")
        seen.add(name)
        params = [p for p in group.pop("params") if p.requires_grad]
        for p in params:
            if id(p) in params_seen:
                raise ConfigError(f"parameter group {name!r} repeats a parameter that another group already holds")
            params_seen.add(id(p))
        if not params:
            continue
        lr = Schedule.parse(group.pop("lr", 1e-3), f"learning rate of parameter group {name!r}").resolve(total_steps)
        schedules.append(ScheduledGroup(name, lr))
        adam_groups.append({"params": params, "name": name, "lr": lr(0) * lr_scale, **group})
    if not adam_groups:
        raise ConfigError("nothing to optimise: the representation and guidance declare no trainable parameters")
    return torch.optim.Adam(adam_groups, betas=betas), schedules


def apply_learning_rates(optimizer: torch.optim.Optimizer, schedules: list[ScheduledGroup], step: int, lr_scale: float, betas) -> None:
    """Set every group's lr (and betas) from the config for this step."""
    by_name = {s.name: s for s in schedules}
    for group in optimizer.param_groups:
        group["lr"] = by_name[group["name"]].lr(step) * lr_scale
        group["betas"] = tuple(betas)


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {f"lr/{g['name']}": float(g["lr"]) for g in optimizer.param_groups}


class OptimizerHooks:
    """What representation hooks get: the unscaling factor and parameter surgery that keeps the
    optimizer consistent (Gaussian densification and pruning, opacity reset)."""

    def __init__(self, optimizer: torch.optim.Optimizer, grad_scale: float = 1.0):
        self.optimizer = optimizer
        self.grad_scale = grad_scale

    def _find(self, param: Tensor) -> tuple[dict, int]:
        for group in self.optimizer.param_groups:
            for i, p in enumerate(group["params"]):
                if p is param:
                    return group, i
        raise KeyError("parameter is not in the optimizer (was it declared in param_groups()?)")

    @torch.no_grad()
    def replace_parameter(self, old: nn.Parameter, new: nn.Parameter, source_rows: Tensor | None = None) -> None:
        """Swap `old` for `new` in the optimizer. Row i of `new` continues row source_rows[i] of
        `old` (its Adam moments are copied); source_rows[i] == -1 starts from zero moments;
        source_rows None keeps everything (same shape). The caller assigns `new` to its module."""
        group, index = self._find(old)
        state = self.optimizer.state.pop(old, None)
        group["params"][index] = new
        if not state:
            return
        if source_rows is None:
            if new.shape != old.shape:
                raise ValueError(f"replace_parameter: shape changed {tuple(old.shape)} -> {tuple(new.shape)} without source_rows")
            self.optimizer.state[new] = state
            return
        source_rows = source_rows.to(old.device).long()
        if source_rows.shape[0] != new.shape[0]:
            raise ValueError(f"replace_parameter: {source_rows.shape[0]} source rows for a parameter of {new.shape[0]} rows")
        fresh = source_rows < 0
        kept = source_rows.clamp_min(0)
        moved = {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == old.shape[0]:
                rows = value[kept].clone()
                rows[fresh] = 0
                moved[key] = rows
            else:
                moved[key] = value
        self.optimizer.state[new] = moved

    @torch.no_grad()
    def reset_state(self, param: Tensor, rows: Tensor | None = None) -> None:
        """Zero the Adam moments of `param` (all rows, or the given ones): an opacity reset."""
        state = self.optimizer.state.get(param)
        if not state:
            return
        for key, value in state.items():
            if key == "step" or not torch.is_tensor(value) or value.dim() == 0:
                continue
            if rows is None:
                value.zero_()
            else:
                value[rows] = 0
