"""A non-finite loss between two logging steps must never reach a checkpoint (issue 9, item 11): every save —
periodic, stop_at_step, preemption, best-on-dev, final — first checks the losses since the last log step."""
from __future__ import annotations

import subprocess
import sys

from conftest import repo_root

SCRIPT = """
import os, signal, sys, torch
from pathlib import Path
from trainer import loop
from trainer.config import OptimConfig, TrainConfig, WandbConfig
from trainer.distributed import make_accelerator
from trainer.errors import UserError

out = Path(sys.argv[1])
calls = []

def batches(start):
    while True:
        yield {"x": torch.ones(2, 4), "attention_mask": torch.ones(2, 3)}

nan_at, stop_at, mode = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]

def loss(model, batch):
    calls.append(1)
    value = model(batch["x"]).pow(2).mean()
    if len(calls) == nan_at and mode == "preempt":
        os.kill(os.getpid(), signal.SIGTERM)  # the job is told to stop in the same step that goes non-finite
    return value * float("nan") if len(calls) == nan_at else value

evaluated = []

def evaluate(model):  # a dev metric that improves at every evaluation: every one saves `best`
    evaluated.append(1)
    return {"task": {"accuracy": len(evaluated) / 100}}

model = torch.nn.Linear(4, 1)
acc, topo = make_accelerator(precision="fp32", micro_batch=2, grad_accum=1, max_grad_norm=0.0, deepspeed_config=None)
job = loop.Job(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), batches=batches, loss=loss,
               samples_per_epoch=100, export=lambda a, m, trained: print("exported"),
               evaluate=evaluate if mode == "best" else None,
               select=lambda r: (1 - r["task"]["accuracy"], {"task": ("accuracy", r["task"]["accuracy"])}))
train = TrainConfig(max_steps=8, micro_batch_size=2, grad_accum=1, max_grad_norm=0.0, log_every=100,
                    save_every=2 if mode == "periodic" else 0, keep_last=10, stop_at_step=stop_at, eval_every=1)
try:
    loop.run(job, loop.LoopConfig(out, 0, train, OptimConfig(lr=1e-3), WandbConfig(), {}), acc, topo, None)
    print("finished")
except UserError as exc:
    print("error:", exc)
"""


def _run(tmp_path, nan_at_step: int, stop_at_step: int = 0, mode: str = "periodic"):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(nan_at_step), str(stop_at_step), mode],
                          cwd=repo_root(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "checkpoints"
    saved = sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.is_dir() else []
    return proc.stdout, saved


def test_periodic_save_after_a_nan_step_is_refused(tmp_path):
    stdout, saved = _run(tmp_path, nan_at_step=3)  # log_every=100: no logging step in between
    assert "error: loss is nan at step 4" in stdout
    assert saved == ["step_00000002"]  # the last good one, untouched


def test_stop_at_step_save_after_a_nan_step_is_refused(tmp_path):
    stdout, saved = _run(tmp_path, nan_at_step=1, stop_at_step=1)
    assert "error: loss is nan at step 1" in stdout
    assert saved == []


def test_preemption_save_after_a_nan_step_is_refused(tmp_path):
    stdout, saved = _run(tmp_path, nan_at_step=3, mode="preempt")  # SIGTERM during step 3, which goes NaN
    assert "error: loss is nan at step 3" in stdout and "stopped at step" not in stdout
    assert saved == []


def test_best_on_dev_save_after_a_nan_step_is_refused(tmp_path):
    import json
    stdout, saved = _run(tmp_path, nan_at_step=3, mode="best")  # dev improves at every step: step 3 would save
    assert "error: loss is nan at step 3" in stdout
    assert saved == ["best"]
    state = json.loads((tmp_path / "checkpoints" / "best" / "trainer_state.json").read_text())
    assert state["step"] == 2  # the best of the good steps, not overwritten by the NaN one


def test_final_save_after_a_nan_step_is_refused(tmp_path):
    stdout, saved = _run(tmp_path, nan_at_step=8, mode="final")  # the run's last step goes NaN
    assert "error: loss is nan at step 8" in stdout and "exported" not in stdout
    assert saved == []


def test_a_finite_run_saves_and_exports(tmp_path):  # the harness itself: without a NaN every path saves
    stdout, saved = _run(tmp_path, nan_at_step=0, mode="best")
    assert "finished" in stdout and "exported" in stdout
    assert saved == ["best", "step_00000008"]
