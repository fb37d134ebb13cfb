"""kill -9 a running `accelerate launch` job as a dying node would — launcher and every rank at once — at a
chosen point: after a given logged step, or while a checkpoint is being written. Used by tests/test_sigkill.py
and bench/kill_soak.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path


def logged_step(out: Path) -> int:
    path = out / "metrics.jsonl"
    step = 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                step = max(step, json.loads(line).get("step", 0))
            except ValueError:  # a line being written
                pass
    return step


def saving(out: Path, at_least: int) -> bool:
    """A checkpoint of step >= `at_least` is being written (its temp dir exists)."""
    root = out / "checkpoints"
    return root.is_dir() and any(p.name.startswith(".tmp-step_") and int(p.name[len(".tmp-step_"):]) >= at_least
                                 for p in root.iterdir())


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group and every descendant: torch's elastic agent may start the ranks in
    sessions of their own, and a rank still in rendezvous when its launcher dies would otherwise wait out the
    30-minute store timeout as an orphan."""
    import psutil
    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        ranks = []
    os.killpg(proc.pid, signal.SIGKILL)
    for p in ranks:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(ranks, timeout=30)


def kill_at(cmd: list[str], env: dict, cwd: Path, out: Path, kind: str, step: int, timeout: float = 300) -> dict:
    """Start `cmd`, SIGKILL its whole process group once `kind` ("step": step `step` logged; "save": a checkpoint
    of step >= `step` being written) happens. Returns what happened; `finished` if the job ended first."""
    errors = tempfile.TemporaryFile("w+")  # a pipe could fill up and stall the job
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=errors, text=True,
                            start_new_session=True)
    hit = (lambda: saving(out, step)) if kind == "save" else (lambda: logged_step(out) >= step)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            if hit():
                _kill_job(proc)
                return {"kind": kind, "step": step, "finished": False, "mid_save": saving(out, 0),
                        "logged": logged_step(out)}
            time.sleep(0.001 if kind == "save" else 0.02)
        if proc.poll() is None:
            raise AssertionError(f"the job neither reached the kill point nor ended within {timeout} s")
        if proc.returncode != 0:
            errors.seek(0)
            raise AssertionError(f"the job failed ({proc.returncode}) before the kill:\n{errors.read()[-3000:]}")
        return {"kind": kind, "step": step, "finished": True, "mid_save": False, "logged": logged_step(out)}
    finally:
        if proc.poll() is None:
            _kill_job(proc)
        errors.close()
