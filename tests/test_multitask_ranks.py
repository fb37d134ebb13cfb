"""Multi-task fine-tuning under DDP and ZeRO-3 with real ranks (issue 9, item 3): it runs past step 1 under DDP,
every rank runs the same task at every step, and the heads of the tasks not drawn in a step do not move."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launching import metrics, run

STEPS = 6


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def checkpoint_weights(step_dir: Path) -> dict:
    if (step_dir / "model.safetensors").is_file():  # DDP: accelerate's whole-model file
        from safetensors.torch import load_file
        return load_file(str(step_dir / "model.safetensors"))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    return get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="pytorch_model")


def task_per_step(out: Path, rank: int) -> dict:
    steps = {}
    for line in (out / "samples" / f"rank{rank}.txt").read_text().splitlines():
        step, task = line.split()[:2]
        assert steps.setdefault(int(step), task) == task  # every micro-batch of a step: one task
    return steps


@pytest.mark.parametrize("setup", ["cpu_ddp", "cpu_zero3"])
def test_same_task_on_every_rank_and_heads_not_drawn_stay_put(tmp_path, cache, setup):
    out = tmp_path / "mt"
    run(setup, out, f"train.max_steps={STEPS}", "train.save_every=1", f"train.keep_last={STEPS + 1}",
        "train.eval_every=100", "train.log_every=1", "train.trace_samples=true", "optim.weight_decay=0.1",
        "optim.warmup_ratio=0", cache=cache, script="finetune.py", config="configs/finetune/tiny_multitask.yaml")
    drawn = task_per_step(out, 0)
    assert drawn == task_per_step(out, 1)  # the same head on both ranks at every step
    assert sorted(drawn) == list(range(STEPS)) and len(set(drawn.values())) > 1
    train = [r for r in metrics(out) if "loss" in r and "split" not in r]
    assert len(train) == STEPS and train[0]["engine"] == ("ddp" if setup == "cpu_ddp" else "deepspeed")

    ckpts = {int(p.name.split("_")[1]): p for p in (out / "checkpoints").glob("step_*")}
    weights = {k: checkpoint_weights(p) for k, p in ckpts.items()}
    tasks = {"topics", "polarity", "length"}
    for step in range(2, STEPS + 1):  # optimizer step index step-1 ran task drawn[step-1]
        before, after = weights[step - 1], weights[step]
        for task in tasks:
            keys = [k for k in after if k.startswith(f"heads.{task}.")]
            assert keys, task
            moved = any(not torch.equal(before[k], after[k]) for k in keys)
            assert moved == (task == drawn[step - 1]), (step, task, drawn[step - 1])
        encoder = [k for k in after if k.startswith("encoder.") and "embeddings" not in k]
        assert any(not torch.equal(before[k], after[k]) for k in encoder)
