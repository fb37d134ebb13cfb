"""Optimizer parameter groups: weight-decay exclusion decided by module type (not name strings).

Built before `accelerator.prepare` so that DeepSpeed partitions each group separately and keeps its lr."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm, nn.RMSNorm)


def _is_norm(module: nn.Module) -> bool:
    # model-specific norms (e.g. T5LayerNorm) subclass nn.Module directly: recognise them by their shape —
    # a module whose only parameters are 1-D scale/shift vectors and that has no children
    if isinstance(module, _NORM_TYPES):
        return True
    params = list(module.parameters(recurse=False))
    return bool(params) and not list(module.children()) and all(p.dim() == 1 for p in params) \
        and not isinstance(module, (nn.Linear, nn.Embedding))


def no_decay_params(model: nn.Module) -> set[int]:
    """ids of parameters that must not be weight-decayed: biases and normalisation weights."""
    out: set[int] = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if _is_norm(module) or name == "bias":
                out.add(id(p))
    return out


def build_param_groups(model: nn.Module, lr: float, weight_decay: float, lr_scale=None, part=None,
                       task_of=None) -> list[dict]:
    """Groups of trainable parameters keyed by (lr, weight decay, task); equal keys merged; no empty group.

    `lr_scale(name) -> float` multiplies the base lr (layer-wise decay plugs in here); `part(name) -> str`
    names where a parameter sits (embeddings, layer_3, head …) for the `param_groups.json` report;
    `task_of(name) -> str | None` keeps each task's head in groups of its own (multi-task: the heads of tasks
    not drawn in a step get lr 0 for it), recorded as the group's `task`."""
    no_decay = no_decay_params(model)
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = lr_scale(name) if lr_scale else 1.0
        wd = 0.0 if id(p) in no_decay else weight_decay
        task = task_of(name) if task_of else None
        key = (round(lr * scale, 15), wd, task)
        g = groups.setdefault(key, {"params": [], "names": [], "parts": [], "lr": lr * scale, "weight_decay": wd,
                                    "task": task})
        g["params"].append(p)
        g["names"].append(name)
        where = part(name) if part else "all"
        if where not in g["parts"]:
            g["parts"].append(where)
    return [g for g in groups.values() if g["params"]]


def describe_groups(groups: list[dict]) -> list[dict]:
    """What `param_groups.json` holds: per group, in optimizer order, its parts, lr, weight decay and size."""
    return [{"index": i, "lr": g["lr"], "weight_decay": g["weight_decay"], "task": g["task"], "parts": g["parts"],
             "num_tensors": len(g["params"]), "num_params": sum(p.numel() for p in g["params"]),
             "names": g["names"]} for i, g in enumerate(groups)]


def make_optimizer(groups: list[dict], betas, eps: float) -> torch.optim.Optimizer:
    """AdamW over the groups (names are kept out of the optimizer, torch rejects unknown keys in some paths), with
    torch's fused kernel: one multi-tensor kernel per group instead of torch's CPU default, a Python loop over the
    tensors (single-tensor Adam was 38 % of a CPU fine-tuning step; fused AdamW steps a 22 M-parameter encoder
    about 6× faster on CPU, bench/optimizer_step.py). torch has it for CPU and CUDA alike; the update is the same
    AdamW (tests/test_optim.py compares the implementations)."""
    torch_groups = [{k: v for k, v in g.items() if k not in ("names", "parts", "task")} for g in groups]
    return torch.optim.AdamW(torch_groups, betas=tuple(betas), eps=eps, fused=True)


def keep_implementation(optimizer: torch.optim.Optimizer) -> None:
    """After loading a checkpoint: torch's `load_state_dict` takes every group setting from the checkpoint, its
    `fused` / `foreach` too, so a run resumed from an older checkpoint would step with the slow implementation
    of the run that wrote it. The implementation is this run's choice, not state: set it back."""
    for group in optimizer.param_groups:
        for key in ("fused", "foreach"):
            if key in optimizer.defaults:
                group[key] = optimizer.defaults[key]


def implementation(optimizer) -> str:
    """The optimizer that steps, as the log and metrics.jsonl name it: its class, and for torch's Adam family the
    kernel its groups run (fused / foreach / single-tensor)."""
    name = type(optimizer).__name__
    groups = getattr(optimizer, "param_groups", None) or [{}]
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        kind = "fused" if groups[0].get("fused") else "foreach" if groups[0].get("foreach") else "single-tensor"
        return f"{name} ({kind})"
    return name
