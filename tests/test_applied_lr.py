"""The lr the partitioned optimizer really APPLIES, per layer group, at later steps of a decaying schedule and on the
first step after a resume — read from the weights, not from the logged lr.

Sign-Adam trick: with betas (0, 0), no weight decay and eps ≈ 0, AdamW's update is lr·g/|g| = ±lr per element at
every step (bias corrections are 1). So between two consecutive checkpoints (`save_every=1`) the median |Δθ| over a
group's moved elements IS the lr that group's optimizer shard used in that step. Expected: base lr · ξ^(L−l) ·
linear(k−1) for step k — and the lr logged at step k−1, which is the one in effect for step k."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from launching import REPO, metrics, run

XI, LR, LAYERS, STEPS, STOP = 0.7, 1e-3, 4, 4, 2
FT = dict(script="finetune.py", config="configs/finetune/tiny.yaml")
SIGN_ADAM = ("optim.betas=[0.0,0.0]", "optim.weight_decay=0", "optim.eps=1e-12")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def fp32_weights(step_dir: Path) -> dict:
    """The fp32 master weights of a DeepSpeed checkpoint (accelerate writes `step_N/pytorch_model/…`)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    assert (step_dir / "pytorch_model").is_dir(), sorted(p.name for p in step_dir.iterdir())
    return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag="pytorch_model").items()}


def applied_lr(before: dict, after: dict, names: list[str]) -> float:
    delta = torch.cat([(after[n] - before[n]).detach().abs().flatten() for n in names])
    moved = delta[delta > 0]
    assert moved.numel() > 1000, f"only {moved.numel()} elements of {names[:3]}… moved"
    return float(moved.median())


def depth_scale(parts: list[str]) -> float:
    scales = {1.0 if p == "head" else XI ** LAYERS if p == "embeddings" else XI ** (LAYERS - int(p.split("_")[1]))
              for p in parts}
    assert len(scales) == 1, f"a group mixes lrs: {parts}"
    return scales.pop()


def linear(step: int) -> float:  # optim.scheduler=linear without warm-up: the factor used by step `step + 1`
    return 1.0 - step / STEPS


def _ds_offload_cpu_adam(tmp: Path) -> Path:
    """ds_configs/zero3_offload.json without `zero_force_ds_cpu_optimizer: false`: DeepSpeed then builds its own
    DeepSpeedCPUAdam over the trainer's groups."""
    ds = json.loads((REPO / "ds_configs" / "zero3_offload.json").read_text())
    ds.pop("zero_force_ds_cpu_optimizer")
    path = tmp / "zero3_offload_cpu_adam.json"
    path.write_text(json.dumps(ds))
    return path


def _cpu_adam_or_skip():
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder
        CPUAdamBuilder().load()
    except Exception as exc:  # noqa: BLE001 — any build failure means the op is unavailable here
        pytest.skip(f"DeepSpeedCPUAdam cannot be built on this machine: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}")


@pytest.mark.parametrize("setup", ["cpu_zero2", "cpu_zero3", "cpu_zero3+DeepSpeedCPUAdam"])
def test_applied_lr_per_layer_later_steps_and_after_resume(tmp_path, cache, setup):
    extra = []
    optimizer_class = "AdamW (fused)"
    if setup.endswith("DeepSpeedCPUAdam"):
        _cpu_adam_or_skip()
        extra = [f"distributed.deepspeed_config={_ds_offload_cpu_adam(tmp_path)}"]
        optimizer_class = "DeepSpeedCPUAdam"
    out = tmp_path / "run"
    common = [f"train.max_steps={STEPS}", "train.save_every=1", "train.keep_last=50", "train.log_every=1",
              "train.eval_every=100", "data.test=null", f"optim.lr={LR}", f"optim.layer_decay={XI}",
              "optim.scheduler=linear", "optim.warmup_ratio=0", "optim.warmup_steps=0", *SIGN_ADAM, *extra]
    launcher = setup.split("+")[0]
    run(launcher, out, *common, f"train.stop_at_step={STOP}", cache=cache, **FT)
    proc = run(launcher, out, *common, cache=cache, flags=["--resume"], **FT)
    assert f"resumed from {out / 'checkpoints' / f'step_{STOP:08d}'}" in proc.stdout

    rows = {r["step"]: r for r in metrics(out) if "lr" in r}
    assert sorted(rows) == list(range(1, STEPS + 1))
    for r in rows.values():
        assert r["optimizer"] == optimizer_class and r["zero_stage"] == int(launcher[-1]), r
        assert ("optimizer=cpu" in r["offload"]) is bool(extra), r
    groups = json.loads((out / "param_groups.json").read_text())
    assert len(groups) == LAYERS + 1  # no weight decay: one group per depth (layer L shares the head's lr)
    assert len({g["lr"] for g in groups}) == LAYERS + 1

    ckpts = {k: out / "checkpoints" / f"step_{k:08d}" for k in range(1, STEPS + 1)}
    weights = {k: fp32_weights(p) for k, p in ckpts.items()}
    for k in range(2, STEPS + 1):  # step k moves the weights of checkpoint k-1 to those of checkpoint k
        for i, g in enumerate(groups):
            expected = LR * depth_scale(g["parts"]) * linear(k - 1)
            got = applied_lr(weights[k - 1], weights[k], g["names"])
            where = f"step {k}{' (first after resume)' if k == STOP + 1 else ''}, group {i} {g['parts']}"
            assert got == pytest.approx(expected, rel=2e-3), where
            assert rows[k - 1]["lr"][i] == pytest.approx(expected, rel=1e-9), where
