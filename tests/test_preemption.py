"""Preemption and torn checkpoints, with real processes and real signals."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import psutil
import pytest

from launching import REPO, accelerate_cmd, env, metrics, run


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _start(out, cache, *overrides, ignore_usr1=False):
    cmd = accelerate_cmd("cpu_zero2", "pretrain.py", "configs/pretrain/tiny.yaml", out, *overrides)
    # like launch/slurm/node_command.py: the launcher ignores SIGUSR1, the trainer installs its own handler
    pre = (lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN)) if ignore_usr1 else None
    return subprocess.Popen(cmd, cwd=REPO, env=env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=pre)


def _wait_for_steps(out, n, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = out / "metrics.jsonl"
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise AssertionError("the run did not reach the wanted step")


@pytest.mark.parametrize("how", ["SIGUSR1 to the whole job", "SIGTERM to the trainer processes"])
def test_signal_checkpoints_exits_0_and_resumes(tmp_path, cache, how):
    out = tmp_path / "run"
    overrides = ["train.max_steps=400", "train.log_every=1", "train.save_every=0"]
    proc = _start(out, cache, *overrides, ignore_usr1=how.startswith("SIGUSR1"))
    _wait_for_steps(out, 5, proc)
    if how.startswith("SIGUSR1"):  # as SLURM does: every process of the job step, launcher included
        launcher = psutil.Process(proc.pid)
        for p in [launcher, *launcher.children(recursive=True)]:
            p.send_signal(signal.SIGUSR1)
    else:
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "pretrain.py" in " ".join(p.cmdline())]
        assert len(workers) == 2
        for w in workers:
            w.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped at step" in stdout
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1
    stopped = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    assert 5 <= stopped < 400
    assert not (out / "hf_model").exists()
    # resume: it continues right after the checkpoint (lines logged past it before the stop are redone once)
    run("cpu_zero2", out, *overrides, f"train.stop_at_step={stopped + 3}", cache=cache, flags=["--resume"])
    assert [r["step"] for r in metrics(out)] == list(range(1, stopped + 4))


def test_torn_checkpoint_falls_back_to_the_previous_one(tmp_path, cache):
    out = tmp_path / "run"
    common = ["train.max_steps=6", "train.log_every=1", "train.save_every=3", "train.keep_last=3"]
    run("cpu_zero2", out, *common, cache=cache)
    latest = out / "checkpoints" / "step_00000006"
    shard = max((p for p in latest.rglob("*") if p.is_file() and p.suffix in (".pt", ".safetensors", ".bin")),
                key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:  # a node died while writing it
        f.truncate(shard.stat().st_size // 2)
    proc = run("cpu_zero2", out, "train.max_steps=8", "train.log_every=1", "train.save_every=3", cache=cache,
               flags=["--resume"])
    warnings = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "incomplete or corrupted" in ln]
    assert len(warnings) == 1 and "step_00000006" in warnings[0]
    assert "resumed from" in proc.stdout and "step_00000003" in proc.stdout
    assert [r["step"] for r in metrics(out)] == list(range(1, 9))
