"""The six learning-rate schedules, as multipliers of each parameter group's own base lr.

Written by hand because transformers' polynomial schedule divides by the optimizer's *default* lr, which breaks
per-group (layer-wise) ratios. Here every schedule is a pure function of the step: every group gets
`base_lr_of_group × multiplier(step)`, so layer ratios hold at every step, and resume needs no scheduler state."""
from __future__ import annotations

import math

from ..config import OptimConfig

NAMES = ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts", "linear", "polynomial")


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    if cfg.warmup_steps > 0:
        return cfg.warmup_steps
    return int(math.ceil(cfg.warmup_ratio * total_steps))


def multiplier(cfg: OptimConfig, step: int, total_steps: int) -> float:
    """lr factor in effect after `step` optimizer steps (HF convention: factor(0) is used by the first step)."""
    name = cfg.scheduler
    if name == "constant":
        return 1.0
    warm = warmup_steps(cfg, total_steps)
    if step < warm:
        return step / max(1, warm)
    if name == "constant_with_warmup":
        return 1.0
    progress = (step - warm) / max(1, total_steps - warm)
    if name == "linear":
        return max(0.0, 1.0 - progress)
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * cfg.num_cycles * progress)))
    if name == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((cfg.num_cycles * progress) % 1.0))))
    if name == "polynomial":
        end = cfg.min_lr_ratio
        if step > total_steps:
            return end
        return (1.0 - end) * (1.0 - progress) ** cfg.power + end
    raise ValueError(f"unknown scheduler {name!r}")


class GroupSchedule:
    """Sets `lr = base_lr × multiplier(step)` on every group. The base lrs come from the run's config (`base_lrs`,
    captured before a checkpoint's optimizer state is loaded), so a resumed run follows the config it was given."""

    def __init__(self, optimizer, cfg: OptimConfig, total_steps: int, base_lrs=None):
        self.optimizer, self.cfg, self.total = optimizer, cfg, total_steps
        for i, group in enumerate(optimizer.param_groups):
            group["base_lr"] = base_lrs[i] if base_lrs is not None else group.get("base_lr", group["lr"])

    def set_step(self, step: int) -> list[float]:
        factor = multiplier(self.cfg, step, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return [g["lr"] for g in self.optimizer.param_groups]
