"""SIGTERM to the launch command itself (`kill`, `timeout`, a pod shutdown), with and without launch/supervise.py."""
from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time

import psutil
import pytest

from launching import REPO, accelerate_cmd, env, metrics
from killing import logged_step
from trainer.checkpoint import latest_complete

SUPERVISE = [sys.executable, str(REPO / "launch" / "supervise.py")]
OVERRIDES = ["train.max_steps=400", "train.log_every=1", "train.save_every=0"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def jobs():
    started = []
    yield started
    for proc in started:  # a failed test leaves no 400-step run behind (the ranks have sessions of their own)
        if proc.poll() is None:
            root = psutil.Process(proc.pid)
            for p in [root, *root.children(recursive=True)]:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.wait()


def _launch(jobs, out, cache, *overrides, supervised, flags=()):
    cmd = accelerate_cmd("cpu_zero2", "pretrain.py", "configs/pretrain/tiny.yaml", out, *overrides, flags=flags)
    # files, not pipes: nobody reads them while the job runs
    stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(SUPERVISE + cmd if supervised else cmd, cwd=REPO, env=env(cache), stdout=stdout,
                            stderr=stderr, text=True, start_new_session=True)
    jobs.append(proc)
    return proc, stdout, stderr


def _finish(proc, stdout, stderr, timeout=300):
    proc.wait(timeout=timeout)
    stdout.seek(0), stderr.seek(0)
    return stdout.read(), stderr.read()


def _sigterm_after(out, proc, step=3, timeout=300):
    deadline = time.time() + timeout
    while logged_step(out) < step:
        assert proc.poll() is None and time.time() < deadline, "the run did not reach the wanted step"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # to that one process, as `kill PID` does


def _started_ranks(pid):
    n = 0
    for p in psutil.Process(pid).children(recursive=True):
        try:
            n += "pretrain.py" in " ".join(p.cmdline())
        except psutil.NoSuchProcess:  # a short-lived helper (DeepSpeed runs gcc at start-up)
            pass
    return n


def test_supervised_sigterm_checkpoints_exits_0_and_resumes(tmp_path, cache, jobs):
    out = tmp_path / "run"
    proc, *files = _launch(jobs, out, cache, *OVERRIDES, supervised=True)
    _sigterm_after(out, proc)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # a second signal while the ranks stop: passed on, nothing killed
    stdout, stderr = _finish(proc, *files)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr[-3000:]
    assert "supervise: SIGTERM" in stdout and "supervise: SIGINT" in stdout, stdout  # the job log (trainer/logs.py)
    assert "(signal SIGUSR1)" in stdout  # the ranks stopped on the supervisor's SIGUSR1
    ckpt = latest_complete(out, verify=True)
    stopped = int(ckpt.name.split("_")[-1])
    assert 3 <= stopped < 400

    proc, *files = _launch(jobs, out, cache, *OVERRIDES, f"train.stop_at_step={stopped + 2}", supervised=True,
                           flags=["--resume"])
    stdout, stderr = _finish(proc, *files)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"resumed from {ckpt}" in stdout
    assert [r["step"] for r in metrics(out)] == list(range(1, stopped + 3))


def test_supervised_sigterm_while_the_ranks_start_waits_for_their_handler(tmp_path, cache, jobs):
    """SIGUSR1 before the trainer installs its handler would kill a rank; the supervisor holds it until then."""
    out = tmp_path / "run"
    proc, *files = _launch(jobs, out, cache, *OVERRIDES, supervised=True)
    deadline = time.time() + 120
    while _started_ranks(proc.pid) < 2:
        assert proc.poll() is None and time.time() < deadline, "the ranks did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = _finish(proc, *files)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped at step" in stdout and latest_complete(out, verify=True) is not None


def test_plain_launcher_sigterm_still_leaves_a_complete_checkpoint(tmp_path, cache, jobs):
    """Without the supervisor torch elastic passes SIGTERM on to the ranks (they checkpoint and exit 0), then
    re-raises it: SignalException traceback, exit code 1. The checkpoint is whole all the same."""
    out = tmp_path / "run"
    proc, *files = _launch(jobs, out, cache, *OVERRIDES, supervised=False)
    _sigterm_after(out, proc)
    stdout, stderr = _finish(proc, *files)
    assert "stopped at step" in stdout, stderr[-3000:]
    assert latest_complete(out, verify=True) is not None
    assert proc.returncode == 1 and "SignalException" in stderr  # what the supervisor is for


def test_supervisor_passes_the_exit_code_through():
    assert subprocess.run([*SUPERVISE, sys.executable, "-c", "raise SystemExit(3)"]).returncode == 3
    killed = subprocess.run([*SUPERVISE, sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"])
    assert killed.returncode == 128 + 9
