"""The precision a single-process / DDP step really ran in, read from the forward (loop.ComputeDtype)."""
from __future__ import annotations

import torch
from torch import nn

from trainer.loop import ComputeDtype


def _model():
    return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_autocast_bf16_is_seen_as_bf16_and_no_autocast_as_fp32():
    model, ids = _model(), torch.tensor([[1, 2, 3]])
    watch = ComputeDtype(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    assert watch.seen() == "bf16"
    watch = ComputeDtype(model)
    model(ids)
    assert watch.seen() == "fp32"


def test_only_the_first_forward_counts_and_the_hook_is_gone_after_it():
    model, ids = _model(), torch.tensor([[1, 2, 3]])
    watch = ComputeDtype(model)
    model(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    assert watch.seen() == "fp32"
    assert not model[1]._forward_hooks


def test_accelerate_bf16_on_a_prepared_model_is_what_the_forward_runs():
    """The path the loop takes: accelerate's mixed_precision wraps the prepared model's forward in autocast."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    try:
        model = Accelerator(mixed_precision="bf16", cpu=True).prepare(_model())
        watch = ComputeDtype(model)
        model(torch.tensor([[1, 2, 3]]))
        assert watch.seen() == "bf16"
    finally:  # the singleton state would otherwise carry bf16 into later tests of this process
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def test_no_linear_layer_says_unknown():
    watch = ComputeDtype(nn.Sequential(nn.Embedding(10, 8)))
    assert watch.seen() == "unknown"
