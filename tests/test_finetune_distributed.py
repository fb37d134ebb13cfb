"""Decisive 2-rank fine-tuning tests through `accelerate launch`: layer-wise decayed LRs under ZeRO-2/3 for every
schedule, the LRs really reaching the optimizer shards, and hierarchical pooling that does not hang ZeRO-3."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tiny_data import save_tiny_bert
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


@pytest.mark.parametrize("setup", ["cpu_zero2", "cpu_zero3"])
@pytest.mark.parametrize("schedule", ["constant", "constant_with_warmup", "cosine", "cosine_with_restarts",
                                      "linear", "polynomial"])
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


@pytest.fixture(scope="module")
def start_model(tmp_path_factory, cache):
    """A tiny BERT saved to disk, so the weights before fine-tuning are known exactly."""
    return save_tiny_bert(tmp_path_factory.mktemp("start") / "bert", cache, LAYERS)


@pytest.mark.parametrize("setup", ["cpu_zero2", "cpu_zero3"])
def test_update_size_follows_xi_in_the_optimizer_shards(tmp_path, cache, start_model, setup):
    """One Adam step (eps≈0, no weight decay): |Δw| = the lr the shard really used. Lower layers must move
    ξ^(L−l) times as far as the top one — the LR reached the partitioned optimizer, not just a dict."""
    out = tmp_path / "run"
    run(setup, out, f"model.name_or_path={start_model}", "train.max_steps=1", "train.eval_every=1",
        f"optim.lr={LR}", f"optim.layer_decay={XI}", "optim.scheduler=constant", "optim.weight_decay=0",
        "optim.eps=1e-12", "train.max_grad_norm=1.0", cache=cache, **FT)
    before = load_file(str(start_model / "model.safetensors"))
    after = load_file(str(out / "hf_model" / "model.safetensors"))

    def step_size(key_after, key_before=None):
        delta = (after[key_after] - before[key_before or key_after]).abs().flatten()
        moved = delta[delta > 0]
        assert moved.numel() > 0.5 * delta.numel() or "embeddings" in key_after
        return float(np.median(moved.numpy()))

    for layer in range(LAYERS):
        key = f"encoder.layer.{layer}.attention.self.query.weight"
        assert step_size("bert." + key, key) == pytest.approx(LR * XI ** (LAYERS - 1 - layer), rel=1e-3), layer
    emb = "embeddings.word_embeddings.weight"
    assert step_size("bert." + emb, emb) == pytest.approx(LR * XI ** LAYERS, rel=1e-3)
    delta_head = (after["classifier.weight"]).abs()  # the head starts elsewhere; its lr is checked via the pooler
    assert delta_head.sum() > 0
    pool = "pooler.dense.weight"
    assert step_size("bert." + pool, pool) == pytest.approx(LR, rel=1e-3)


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
