"""LR schedules (vs transformers' reference implementations) and weight-decay parameter groups."""
from __future__ import annotations


import pytest
import torch
from torch import nn
from transformers import optimization as hf

from trainer.config import OptimConfig
from trainer.optim.param_groups import (build_param_groups, implementation, keep_implementation, make_optimizer,
                                        no_decay_params)
from trainer.optim.schedules import NAMES, GroupSchedule, multiplier, warmup_steps

TOTAL = 100


def _dummy_opt(lr=1.0):
    return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)


def _hf_factors(make, total=TOTAL, **kw):
    sched = make(_dummy_opt(), **kw)
    return [sched.lr_lambdas[0](s) for s in range(total + 6)]


def _ours(cfg, total=TOTAL):
    return [multiplier(cfg, s, total) for s in range(total + 6)]


def test_names_match_config_choices():
    from trainer.config import CHOICES
    assert tuple(sorted(NAMES)) == tuple(sorted(CHOICES["optim.scheduler"]))


@pytest.mark.parametrize("warm", [0, 10])
def test_linear(warm):
    cfg = OptimConfig(scheduler="linear", warmup_steps=warm)
    ref = _hf_factors(hf.get_linear_schedule_with_warmup, num_warmup_steps=warm, num_training_steps=TOTAL)
    assert _ours(cfg) == pytest.approx(ref, abs=1e-12)


def test_constant():
    cfg = OptimConfig(scheduler="constant", warmup_steps=10)  # warmup does not apply to `constant`
    assert _ours(cfg) == pytest.approx(_hf_factors(hf.get_constant_schedule), abs=1e-12)


@pytest.mark.parametrize("warm", [0, 7])
def test_constant_with_warmup(warm):
    cfg = OptimConfig(scheduler="constant_with_warmup", warmup_steps=warm)
    ref = _hf_factors(hf.get_constant_schedule_with_warmup, num_warmup_steps=warm)
    assert _ours(cfg) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("cycles", [1, 2, 3])
@pytest.mark.parametrize("warm", [0, 10])
def test_cosine_with_restarts(cycles, warm):
    cfg = OptimConfig(scheduler="cosine_with_restarts", warmup_steps=warm, num_cycles=float(cycles))
    ref = _hf_factors(hf.get_cosine_with_hard_restarts_schedule_with_warmup, num_warmup_steps=warm,
                      num_training_steps=TOTAL, num_cycles=cycles)
    assert _ours(cfg) == pytest.approx(ref, abs=1e-12)


def test_cosine_warmup_part():
    cfg = OptimConfig(scheduler="cosine", warmup_steps=10)
    ours = _ours(cfg)
    assert ours[:11] == pytest.approx([s / 10 for s in range(11)], abs=1e-12)


@pytest.mark.parametrize("warm", [0, 10])
def test_cosine_default_decays_to_zero(warm):
    cfg = OptimConfig(scheduler="cosine", warmup_steps=warm)  # default num_cycles
    ref = _hf_factors(hf.get_cosine_schedule_with_warmup, num_warmup_steps=warm, num_training_steps=TOTAL)
    ours = _ours(cfg)
    assert ours[TOTAL] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b - 1e-12 for a, b in zip(ours[warm:TOTAL + 1], ours[warm + 1:TOTAL + 1]))  # non-increasing
    assert ours[:TOTAL + 1] == pytest.approx(ref[:TOTAL + 1], abs=1e-12)


@pytest.mark.parametrize("power,end,warm", [(1.0, 0.0, 0), (2.0, 0.1, 10), (0.5, 0.25, 5)])
def test_polynomial(power, end, warm):
    cfg = OptimConfig(scheduler="polynomial", warmup_steps=warm, power=power, min_lr_ratio=end)
    ours = _ours(cfg)
    for s, f in enumerate(ours):
        if s < warm:
            want = s / warm
        elif s > TOTAL:
            want = end
        else:
            progress = (s - warm) / (TOTAL - warm)
            want = (1 - end) * (1 - progress) ** power + end
        assert f == pytest.approx(want, abs=1e-12), s
    # transformers' version agrees for a single group with lr 1 (lr_end is absolute there)
    ref = _hf_factors(hf.get_polynomial_decay_schedule_with_warmup, num_warmup_steps=warm,
                      num_training_steps=TOTAL, lr_end=end if end > 0 else 1e-7, power=power)
    assert ours == pytest.approx(ref, abs=1e-6)


def test_warmup_ratio_vs_steps():
    assert warmup_steps(OptimConfig(warmup_ratio=0.05), 300) == 15
    assert warmup_steps(OptimConfig(warmup_ratio=0.01), 150) == 2  # ceil, as transformers does
    assert warmup_steps(OptimConfig(warmup_ratio=0.0), 150) == 0
    assert warmup_steps(OptimConfig(warmup_ratio=0.5, warmup_steps=3), 150) == 3  # steps win
    by_ratio = OptimConfig(scheduler="linear", warmup_ratio=0.1)
    by_steps = OptimConfig(scheduler="linear", warmup_steps=10)
    assert _ours(by_ratio) == _ours(by_steps)
    ref = _hf_factors(hf.get_linear_schedule_with_warmup, num_warmup_steps=10, num_training_steps=TOTAL)
    assert _ours(by_ratio) == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_group_schedule_keeps_ratios(name):
    cfg = OptimConfig(scheduler=name, warmup_steps=5, num_cycles=1.0, min_lr_ratio=0.1)
    p1, p2, p3 = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.AdamW([{"params": [p1], "lr": 1e-3}, {"params": [p2], "lr": 2.5e-4},
                             {"params": [p3], "lr": 1e-5}], lr=7.0)
    sched = GroupSchedule(opt, cfg, 50, [1e-3, 2.5e-4, 1e-5])
    for step in [0, 1, 3, 5, 6, 20, 37, 49, 50, 60, 20]:
        lrs = sched.set_step(step)
        f = multiplier(cfg, step, 50)
        assert lrs == pytest.approx([1e-3 * f, 2.5e-4 * f, 1e-5 * f], rel=1e-12, abs=1e-18)
        assert [g["lr"] for g in opt.param_groups] == lrs
    sched.set_step(20)
    sched.set_step(20)  # idempotent: factors never compound
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * multiplier(cfg, 20, 50))
    # loading optimizer state replaces the group dicts (as DeepSpeed's loaders do): the schedule still reaches them
    opt.load_state_dict(opt.state_dict())
    assert sched.set_step(10) == pytest.approx([x * multiplier(cfg, 10, 50) for x in (1e-3, 2.5e-4, 1e-5)])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([x * multiplier(cfg, 10, 50)
                                                                  for x in (1e-3, 2.5e-4, 1e-5)])


def test_group_schedule_gate_zeroes_groups():
    cfg = OptimConfig(scheduler="constant")
    opt = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(2))], "lr": 1.0} for _ in range(3)])
    sched = GroupSchedule(opt, cfg, 10, [1.0, 2.0, 3.0], gate=lambda step: [1.0, float(step % 2), 0.0])
    assert sched.set_step(1) == [1.0, 2.0, 0.0]
    assert sched.set_step(2) == [1.0, 0.0, 0.0]


def test_group_schedule_starts_late():
    """start=4 (a head warm-up): steps 0–3 at the base lrs × gate, then the schedule runs over the remaining 16
    steps from its own beginning — its warm-up ramp and its decay to 0 at step 20."""
    cfg = OptimConfig(scheduler="linear", warmup_steps=2)
    opt = torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(2))], "lr": 1.0} for _ in range(2)])
    sched = GroupSchedule(opt, cfg, 20, [1e-4, 1e-4], gate=lambda step: [10.0, 0.0] if step < 4 else [1.0, 1.0],
                          start=4)
    assert [sched.set_step(s) for s in range(4)] == [pytest.approx([1e-3, 0.0])] * 4
    for step in range(4, 21):
        assert sched.set_step(step) == pytest.approx([1e-4 * multiplier(cfg, step - 4, 16)] * 2, abs=1e-15)
    assert sched.set_step(4) == [0.0, 0.0] and sched.set_step(6) == pytest.approx([1e-4] * 2)  # ramp restarts


# ----------------------------------------------------------------------------- parameter groups
@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertForMaskedLM
    torch.manual_seed(0)
    conf = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    return BertForMaskedLM(conf)


def _reference_no_decay(name: str) -> bool:
    return name.endswith(".bias") or name == "bias" or "LayerNorm" in name


def test_param_groups_decay_split(tiny_bert):
    groups = build_param_groups(tiny_bert, lr=1e-3, weight_decay=0.01)
    assert len(groups) == 2
    assert all(g["params"] and len(g["params"]) == len(g["names"]) for g in groups)
    by_name = {n: g["weight_decay"] for g in groups for n in g["names"]}
    params = dict(tiny_bert.named_parameters())
    assert set(by_name) == set(params)  # every trainable parameter exactly once
    assert sum(len(g["names"]) for g in groups) == len(params)
    for name, wd in by_name.items():
        assert wd == (0.0 if _reference_no_decay(name) else 0.01), name
    # sanity: the model really has each kind
    assert by_name["bert.embeddings.word_embeddings.weight"] == 0.01
    assert by_name["bert.embeddings.position_embeddings.weight"] == 0.01
    assert by_name["bert.encoder.layer.0.attention.self.query.weight"] == 0.01
    assert by_name["bert.encoder.layer.0.attention.self.query.bias"] == 0.0
    assert by_name["bert.embeddings.LayerNorm.weight"] == 0.0
    assert by_name["bert.encoder.layer.1.output.LayerNorm.weight"] == 0.0
    assert all(g["lr"] == 1e-3 for g in groups)
    # the groups hold the parameter objects themselves
    for g in groups:
        for n, p in zip(g["names"], g["params"]):
            assert p is params[n]


def test_param_groups_lr_scale_merges_equal_keys(tiny_bert):
    def scale(name):
        if ".layer.0." in name:
            return 0.5
        if ".layer.1." in name:
            return 0.5  # same as layer 0 → same groups
        return 1.0
    groups = build_param_groups(tiny_bert, lr=1e-3, weight_decay=0.1, lr_scale=scale)
    keys = [(g["lr"], g["weight_decay"]) for g in groups]
    assert len(keys) == len(set(keys)) == 4
    for g in groups:
        for n in g["names"]:
            assert g["lr"] == pytest.approx(1e-3 * scale(n))
            assert g["weight_decay"] == (0.0 if _reference_no_decay(n) else 0.1)


def test_param_groups_exclude_frozen(tiny_bert):
    frozen = [n for n, p in tiny_bert.named_parameters() if n.startswith("bert.embeddings.")]
    try:
        for n, p in tiny_bert.named_parameters():
            if n in frozen:
                p.requires_grad_(False)
        groups = build_param_groups(tiny_bert, lr=1e-3, weight_decay=0.01)
        names = [n for g in groups for n in g["names"]]
        assert names and not set(names) & set(frozen)
        assert all(g["params"] for g in groups)
        assert len(names) == sum(1 for p in tiny_bert.parameters() if p.requires_grad)
    finally:
        for p in tiny_bert.parameters():
            p.requires_grad_(True)


def test_no_empty_group_when_everything_decays():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    groups = build_param_groups(model, lr=0.1, weight_decay=0.01)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.01 and len(groups[0]["params"]) == 2


def test_custom_norm_module_recognised():
    class MyRMSNorm(nn.Module):  # model-specific norm that does not subclass nn.LayerNorm
        def __init__(self, d):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(d))

        def forward(self, x):
            return x * self.scale

    model = nn.Sequential(nn.Linear(4, 4), MyRMSNorm(4), nn.LayerNorm(4), nn.Embedding(5, 4))
    nd = no_decay_params(model)
    named = dict(model.named_parameters())
    assert {n for n, p in named.items() if id(p) in nd} == {"0.bias", "1.scale", "2.weight", "2.bias"}


def test_make_optimizer_keeps_group_lrs(tiny_bert):
    groups = build_param_groups(tiny_bert, lr=1e-3, weight_decay=0.01, lr_scale=lambda n: 2.0 if "layer.1" in n else 1.0)
    opt = make_optimizer(groups, [0.9, 0.98], 1e-6)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    assert [g["weight_decay"] for g in opt.param_groups] == [g["weight_decay"] for g in groups]
    assert all("names" not in g for g in opt.param_groups)
    assert opt.param_groups[0]["betas"] == (0.9, 0.98)
    assert "names" in groups[0]  # the caller's groups are not mutated


def _stepped(model, opt, steps=5):
    torch.manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_fused_adamw_is_the_same_update_as_torchs_reference_loop(tiny_bert):
    """make_optimizer's fused kernel vs torch's single-tensor AdamW, same groups (layer-wise lrs, decay split):
    the same weights after several steps, to float32 rounding."""
    import copy
    ref_model = copy.deepcopy(tiny_bert)
    lr_scale = lambda n: 0.5 if "layer.0" in n else 1.0  # noqa: E731
    opt = make_optimizer(build_param_groups(tiny_bert, lr=1e-2, weight_decay=0.01, lr_scale=lr_scale),
                         [0.9, 0.98], 1e-6)
    ref_groups = [{k: v for k, v in g.items() if k not in ("names", "parts", "task")}
                  for g in build_param_groups(ref_model, lr=1e-2, weight_decay=0.01, lr_scale=lr_scale)]
    ref = torch.optim.AdamW(ref_groups, betas=(0.9, 0.98), eps=1e-6, foreach=False)
    for a, b in zip(_stepped(tiny_bert, opt), _stepped(ref_model, ref)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert implementation(opt) == "AdamW (fused)" and implementation(ref) == "AdamW (single-tensor)"


def test_resuming_a_checkpoint_of_the_slow_implementation_keeps_the_fused_one(tiny_bert):
    """torch's load_state_dict copies every group setting from the checkpoint, `fused` included; the run's own
    choice is set back, and the moments come through."""
    groups = build_param_groups(tiny_bert, lr=1e-3, weight_decay=0.01)
    old = torch.optim.AdamW([{k: v for k, v in g.items() if k not in ("names", "parts", "task")} for g in groups])
    _stepped(tiny_bert, old, steps=2)
    opt = make_optimizer(build_param_groups(tiny_bert, lr=1e-3, weight_decay=0.01), [0.9, 0.999], 1e-8)
    opt.load_state_dict(old.state_dict())
    assert implementation(opt) == "AdamW (single-tensor)"  # what torch alone would leave
    keep_implementation(opt)
    assert implementation(opt) == "AdamW (fused)"
    p = next(tiny_bert.parameters())
    assert torch.equal(opt.state[p]["exp_avg"], old.state[p]["exp_avg"])
    _stepped(tiny_bert, opt, steps=1)  # and it steps
