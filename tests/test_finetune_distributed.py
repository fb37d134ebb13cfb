"""Decisive 2-rank fine-tuning tests through `accelerate launch`: layer-wise decayed LRs under ZeRO-2/3 for every
schedule and hierarchical pooling that does not hang ZeRO-3. (That each group's lr really reaches the optimizer
shards, read from the weights: tests/test_applied_lr.py.)"""
from __future__ import annotations

import json

import pytest
import torch

from launching import metrics, run

XI, LR, LAYERS, STEPS = 0.8, 1e-3, 4, 6
FT = dict(script="finetune.py", config="configs/finetune/tiny.yaml")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def reference_multiplier(name: str, step: int, total: int, warmup: int) -> float:
    """transformers' own schedules (their polynomial with lr_init=1, lr_end=0 is the per-group one)."""
    import transformers as t
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    make = {
        "constant": lambda: t.get_constant_schedule(opt),
        "constant_with_warmup": lambda: t.get_constant_schedule_with_warmup(opt, warmup),
        "cosine": lambda: t.get_cosine_schedule_with_warmup(opt, warmup, total),
        "cosine_with_restarts": lambda: t.get_cosine_with_hard_restarts_schedule_with_warmup(opt, warmup, total),
        "linear": lambda: t.get_linear_schedule_with_warmup(opt, warmup, total),
        "polynomial": lambda: t.get_polynomial_decay_schedule_with_warmup(opt, warmup, total, lr_end=0.0),
    }[name]()
    return make.lr_lambdas[0](step)


def depth_scale(parts: list[str]) -> float:
    """Expected lr factor of a group from the parts it holds: embeddings ξ^L, layer_l ξ^(L−l), head 1."""
    scales = {1.0 if p == "head" else XI ** LAYERS if p == "embeddings" else XI ** (LAYERS - int(p.split("_")[1]))
              for p in parts}
    assert len(scales) == 1, f"a group mixes lrs: {parts}"
    return scales.pop()


# every schedule under ZeRO-2; under ZeRO-3 (the same scheduler over differently partitioned groups) the two
# with the most shape — warm-up then decay, and restarts
SCHEDULES = [(s, "cpu_zero2") for s in ("constant", "constant_with_warmup", "cosine", "cosine_with_restarts",
                                       "linear", "polynomial")] + [("linear", "cpu_zero3"),
                                                                   ("cosine_with_restarts", "cpu_zero3")]


@pytest.mark.parametrize("schedule,setup", SCHEDULES, ids=[f"{s}-{z}" for s, z in SCHEDULES])
def test_logged_lr_of_every_group_is_lr_xi_depth_schedule(tmp_path, cache, setup, schedule):
    out = tmp_path / "run"
    run(setup, out, f"train.max_steps={STEPS}", "train.log_every=1", f"train.eval_every={STEPS}", "data.test=null",
        f"optim.lr={LR}", f"optim.layer_decay={XI}", f"optim.scheduler={schedule}", "optim.warmup_steps=2",
        cache=cache, **FT)
    groups = json.loads((out / "param_groups.json").read_text())
    assert len(groups) == 2 * (LAYERS + 1)  # embeddings, layers 1..L-1, (layer L + head); × decay / no decay
    for g in groups:
        assert g["lr"] == pytest.approx(LR * depth_scale(g["parts"]), rel=1e-9)
    rows = [r for r in metrics(out) if "lr" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        factor = reference_multiplier(schedule, r["step"], STEPS, 2)
        assert r["lr"] == pytest.approx([g["lr"] * factor for g in groups], rel=1e-6, abs=1e-15), r["step"]
        assert r["zero_stage"] == int(setup[-1]) and r["world_size"] == 2


def test_hierarchical_pooling_with_uneven_chunks_does_not_hang_zero3(tmp_path, cache):
    """Documents of 1..4 chunks: the ranks' micro-batches hold different chunk counts every step."""
    out = tmp_path / "run"
    run("cpu_zero3", out, "text.strategy=hierarchical", "text.max_len=16", "text.max_chunks=4",
        "text.chunk_pool=attention", "train.max_steps=12", "train.eval_every=6", "train.log_every=3",
        cache=cache, timeout=400, **FT)
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results) == {"dev", "test"}
    assert results["test"]["n"] == 500 and sum(map(sum, results["test"]["confusion_matrix"])) == 500
    assert [r["step"] for r in metrics(out) if r.get("split") == "dev"] == [6, 12]
