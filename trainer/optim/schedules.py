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
    """Sets `lr = base_lr × multiplier(step) × gate` on every group of the optimizer the engine really steps.

    `optimizer` is that optimizer (DeepSpeed may build its own, e.g. DeepSpeedCPUAdam under offload, and a loaded
    checkpoint replaces the group dicts), so its `param_groups` are looked up at every step, never cached. The
    base lrs come from the run's config (`base_lrs`, captured before a checkpoint is loaded), so a resumed run
    follows the config it was given. `gate(step)`, when given, is a per-group factor (multi-task: 0 for the heads
    of tasks not drawn in that step). `start` > 0 delays the schedule: steps before it run at the base lrs (times
    the gate), and from `start` on the schedule runs over the remaining `total_steps - start` steps as if the run
    began there (a head warm-up is a phase of its own; the encoder then gets its full lr warm-up and decay). The
    returned lrs are read back from the optimizer."""

    def __init__(self, optimizer, cfg: OptimConfig, total_steps: int, base_lrs, gate=None, start: int = 0):
        self.optimizer, self.cfg, self.total, self.base_lrs, self.gate = optimizer, cfg, total_steps, base_lrs, gate
        self.start = start
        if len(optimizer.param_groups) != len(base_lrs):
            raise RuntimeError(f"the engine's optimizer has {len(optimizer.param_groups)} parameter groups, "
                               f"the trainer built {len(base_lrs)}")

    def set_step(self, step: int) -> list[float]:
        factor = 1.0 if step < self.start else multiplier(self.cfg, step - self.start, self.total - self.start)
        gates = self.gate(step) if self.gate else [1.0] * len(self.base_lrs)
        for group, base, gate in zip(self.optimizer.param_groups, self.base_lrs, gates):
            group["lr"] = base * factor * gate
        return [float(g["lr"]) for g in self.optimizer.param_groups]
