"""train.global_batch_size and train.micro_batch_size=auto: the split of the global batch, the probe's back-off
on out-of-memory (injected on CPU through BERT_RECIPE_FAKE_OOM_ABOVE) and the ranks' agreement, under DDP and
ZeRO-3 — and a resume that probes another size keeps the examples of every optimizer step."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import pytest
import torch

from launching import log_messages, metrics, run
from tiny_data import data_overrides, tiny_splits
from trainer import micro_batch
from trainer.config import TrainConfig
from trainer.errors import UserError

FT = {"script": "finetune.py", "config": "configs/finetune/tiny.yaml"}


def test_the_global_batch_is_split_or_refused():
    t = TrainConfig(micro_batch_size=4, global_batch_size=32)
    assert micro_batch.resolve(t, 2) == (replace(t, grad_accum=4), False)
    auto = replace(t, micro_batch_size="auto")
    assert micro_batch.resolve(auto, 2) == (replace(auto, micro_batch_size=16, grad_accum=1), True)
    assert micro_batch.resolve(TrainConfig(micro_batch_size=4), 2) == (TrainConfig(micro_batch_size=4), False)
    for bad, world, match in ((replace(auto, global_batch_size=None), 1, "needs train.global_batch_size"),
                              (replace(t, global_batch_size=30), 4, "positive multiple of the 4 rank"),
                              (replace(t, micro_batch_size=3), 2, "which train.micro_batch_size=3 does not divide"),
                              (replace(t, grad_accum=2), 2, "train.grad_accum=2 contradicts"),
                              (replace(auto, grad_accum=2), 2, "remove train.grad_accum=2"),
                              (replace(t, micro_batch_size="big"), 2, "an integer >= 1 or auto")):
        with pytest.raises(UserError, match=match):
            micro_batch.resolve(bad, world)


def test_the_probe_backs_off_to_the_largest_size_every_rank_fits():
    seen = []

    def attempt(m):
        seen.append(m)
        if m > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert micro_batch.choose(24, attempt, lambda ok: ok) == (4, [(24, False), (12, False), (8, False),
                                                                     (6, False), (4, True)])
    assert seen == [24, 12, 8, 6, 4]
    # another rank failed at 4: the agreement goes on to the next size
    votes = iter([False, True])
    assert micro_batch.choose(4, lambda m: None, lambda ok: next(votes))[0] == 2
    with pytest.raises(UserError, match="even a micro-batch of 1 runs out of memory"):
        micro_batch.choose(2, lambda m: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")),
                           lambda ok: ok)

    def broken(m):
        raise ValueError("a bug, not memory")
    with pytest.raises(ValueError):  # anything but out-of-memory is not swallowed
        micro_batch.choose(4, broken, lambda ok: ok)


def _step_examples(out) -> dict:
    """{optimizer step: the set of example indexes it trained on, over every rank and micro-step}."""
    steps = defaultdict(set)
    for trace in (out / "samples").glob("rank*.txt"):
        for line in trace.read_text().splitlines():
            step, _task, *idx = line.split()
            steps[int(step)].update(map(int, idx))
    return dict(steps)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_splits(tmp_path_factory.mktemp("data"))


ARGS = ("train.micro_batch_size=auto", "train.global_batch_size=32", "train.max_steps=4", "train.eval_every=4",
        "train.log_every=1", "train.save_every=2", "train.trace_samples=true")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, cache, data):
    """2 DDP ranks, rank 0 fits 16, rank 1 only 8: they agree on 8 (x grad_accum 2 x 2 ranks = 32)."""
    out = tmp_path_factory.mktemp("ddp") / "out"
    proc = run("cpu_ddp", out, *data_overrides(data), *ARGS, cache=cache, extra_env={micro_batch.FAKE_OOM: "16,8"},
               timeout=300, **FT)
    return out, proc


def test_ddp_ranks_agree_on_the_size_both_fit(ddp_run):
    out, proc = ddp_run
    train = [m for m in metrics(out) if "loss" in m]
    assert {(m["micro_batch_size"], m["grad_accum"], m["engine"]) for m in train} == {(8, 2, "ddp")}
    assert any("tried 16 ✗, 8)" in line for line in log_messages(proc.stdout)), proc.stdout[-3000:]
    assert all(len(ex) == 32 for ex in _step_examples(out).values())


def test_zero3_resume_on_other_memory_reprobes_and_keeps_every_steps_examples(tmp_path, cache, data, ddp_run):
    """ZeRO-3, 2 ranks: 4 fits (16 and 8 do not) → 4 x 4; stopped at step 2 and resumed where 8 fits → 8 x 2.
    Every optimizer step trains on the examples the DDP run's steps (8 x 2) trained on: the global batch, not
    the micro-batch, decides them."""
    out = tmp_path / "z3"
    run("cpu_zero3", out, *data_overrides(data), *ARGS, "train.stop_at_step=2", cache=cache,
        extra_env={micro_batch.FAKE_OOM: "4"}, timeout=300, **FT)
    first = [m for m in metrics(out) if "loss" in m]
    assert {(m["micro_batch_size"], m["grad_accum"], m["zero_stage"]) for m in first} == {(4, 4, 3)}
    run("cpu_zero3", out, *data_overrides(data), *ARGS, cache=cache, flags=("--resume",),
        extra_env={micro_batch.FAKE_OOM: "8"}, timeout=300, **FT)
    later = [m for m in metrics(out) if "loss" in m and m["step"] > 2]
    assert [m["step"] for m in later] == [3, 4] and {(m["micro_batch_size"], m["grad_accum"]) for m in later} == {
        (8, 2)}
    assert _step_examples(out) == _step_examples(ddp_run[0])
    assert (out / "hf_model" / "config.json").is_file()
