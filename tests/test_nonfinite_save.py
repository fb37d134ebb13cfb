"""A non-finite loss between two logging steps must never reach a checkpoint (issue 9, item 11): every save —
periodic, stop_at_step, preemption, best-on-dev, final — first checks the losses since the last log step."""
from __future__ import annotations

import subprocess
import sys

from conftest import repo_root

SCRIPT = """
import sys, torch
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

def loss(model, batch):
    calls.append(1)
    value = model(batch["x"]).pow(2).mean()
    return value * float("nan") if len(calls) == int(sys.argv[2]) else value

model = torch.nn.Linear(4, 1)
acc, topo = make_accelerator(precision="fp32", micro_batch=2, grad_accum=1, max_grad_norm=0.0, deepspeed_config=None)
job = loop.Job(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), batches=batches, loss=loss,
               samples_per_epoch=100, export=lambda a, m: None)
train = TrainConfig(max_steps=8, micro_batch_size=2, grad_accum=1, max_grad_norm=0.0, log_every=100, save_every=2,
                    keep_last=10, stop_at_step=int(sys.argv[3]))
try:
    loop.run(job, loop.LoopConfig(out, 0, train, OptimConfig(lr=1e-3), WandbConfig(), {}), acc, topo, None)
    print("finished")
except UserError as exc:
    print("error:", exc)
"""


def _run(tmp_path, nan_at_step: int, stop_at_step: int = 0):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(nan_at_step), str(stop_at_step)],
                          cwd=repo_root(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "checkpoints"
    saved = sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) if root.is_dir() else []
    return proc.stdout, saved


def test_periodic_save_after_a_nan_step_is_refused(tmp_path):
    stdout, saved = _run(tmp_path, nan_at_step=3)  # log_every=100: no logging step in between
    assert "error: loss is nan at step 4" in stdout
    assert saved == ["step_00000002"]  # the last good one, untouched


def test_stop_at_step_save_after_a_nan_step_is_refused(tmp_path):
    stdout, saved = _run(tmp_path, nan_at_step=1, stop_at_step=1)
    assert "error: loss is nan at step 1" in stdout
    assert saved == []
