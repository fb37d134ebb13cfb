"""kill -9 at seeded random points, one of them while a checkpoint is being written, then --resume: the run
ends with the weights of the uninterrupted run (dropout on: same data, masks, dropout and lrs after each kill)."""
from __future__ import annotations

import random

import pytest
from safetensors.torch import load_file

from killing import kill_at
from launching import REPO, accelerate_cmd, env, metrics, run

SEED = 20261127


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_sigkill_mid_step_and_mid_save_then_resume_gives_the_uninterrupted_weights(tmp_path, cache):
    setup = "cpu_zero3"  # the hardest case (partitioned weights); bench/kill_soak.py runs 20 kills on any setup
    common = ["train.max_steps=12", "train.log_every=1", "train.save_every=2", "train.keep_last=2"]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    run(setup, ref, *common, cache=cache)

    rng = random.Random(SEED)
    plan = [("save", rng.randint(2, 6)), ("step", rng.randint(5, 9)), ("step", rng.randint(9, 11))]
    trials = []
    for kind, step in plan:
        for attempt in range(3):  # a save can finish before the poll sees it: then try the next one
            cmd = accelerate_cmd(setup, "pretrain.py", "configs/pretrain/tiny.yaml", out, *common,
                                 flags=["--resume"] if trials else [])
            trial = kill_at(cmd, env(cache), REPO, out, kind, step + 2 * attempt)
            trials.append(trial)
            assert not trial["finished"], trials
            if kind == "step" or trial["mid_save"]:
                break
    assert any(t["mid_save"] for t in trials), f"no kill landed inside a checkpoint write: {trials}"

    run(setup, out, *common, cache=cache, flags=["--resume"])
    a, b = metrics(ref), metrics(out)
    assert [r["step"] for r in b] == list(range(1, 13)), "a step is missing or logged twice"
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-6, abs=1e-6), (x, y)
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-9)
    wa = load_file(str(ref / "hf_model" / "model.safetensors"))
    wb = load_file(str(out / "hf_model" / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
