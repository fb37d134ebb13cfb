"""Recovery end to end with 2 real ranks under ZeRO-2: a same-size corruption of checkpoint files is caught by the
manifest's checksums on --resume (fallback to the previous intact checkpoint), and a preemption signal that
reaches only one rank still stops every rank at the same step."""
from __future__ import annotations

import json
import signal
import subprocess
import time

import psutil
import pytest

from launching import REPO, accelerate_cmd, env, log_messages, metrics, run
from trainer.checkpoint import is_complete


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def flip_middle(path, n: int = 64) -> None:
    """Invert n bytes in the middle of the file: same size, other content."""
    size = path.stat().st_size
    assert size > 4 * n, path
    with open(path, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(n)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    assert path.stat().st_size == size


def test_same_size_corruption_falls_back_to_the_previous_checkpoint(tmp_path, cache):
    out = tmp_path / "run"
    common = ["train.log_every=1", "train.save_every=2", "train.keep_last=5"]
    run("cpu_zero2", out, "train.max_steps=6", *common, cache=cache)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000004", "step_00000006"]
    # step 6: the model file; step 4: rank 1's optimizer partition (hashed by another rank at save time)
    model_file = ckpts / "step_00000006" / "pytorch_model" / "mp_rank_00_model_states.pt"
    optim_file = ckpts / "step_00000004" / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    for f in (model_file, optim_file):
        flip_middle(f)
    for step in ("step_00000006", "step_00000004"):  # sizes still match: only the checksum can tell
        assert is_complete(ckpts / step) and not is_complete(ckpts / step, verify=True)

    proc = run("cpu_zero2", out, "train.max_steps=8", *common, cache=cache, flags=["--resume"])
    log = (proc.stdout + proc.stderr).splitlines()
    warnings = [ln for ln in log if "incomplete or corrupted" in ln]
    assert len(warnings) == 2, warnings
    assert "step_00000006" in warnings[0] and "step_00000004" in warnings[1]
    resumed = [m for m in log_messages(proc.stdout) if m.startswith("resumed from")]
    assert len(resumed) == 1 and "step_00000002 at step 2 " in resumed[0], resumed
    assert [r["step"] for r in metrics(out)] == list(range(1, 9))
    assert json.loads((ckpts / "step_00000008" / "trainer_state.json").read_text())["step"] == 8
    assert (out / "hf_model" / "model.safetensors").is_file()


def _ranks(launcher: psutil.Process, timeout: float = 120) -> dict:
    """{rank: process} of the trainer processes under the launcher."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = {}
        for p in launcher.children(recursive=True):
            try:
                if "pretrain.py" in " ".join(p.cmdline()) and "RANK" in p.environ():
                    found[int(p.environ()["RANK"])] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        if len(found) == 2:
            return found
        time.sleep(0.2)
    raise AssertionError("the two rank processes did not appear")


def test_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path, cache):
    """SIGUSR1 reaches rank 1 only (not rank 0, which prints and decides, nor the launcher)."""
    out = tmp_path / "run"
    cmd = accelerate_cmd("cpu_zero2", "pretrain.py", "configs/pretrain/tiny.yaml", out, "train.max_steps=400",
                         "train.log_every=1", "train.save_every=0")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        ranks = _ranks(psutil.Process(proc.pid))
        deadline = time.time() + 300
        while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        ranks[1].send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    for p in ranks.values():
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    stops = [m for m in log_messages(stdout) if m.startswith("stopped at step")]
    assert len(stops) == 1, stdout[-2000:]
    assert "(signal on another rank)" in stops[0]  # rank 0 prints it, and it got no signal itself
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    assert len(ckpts) == 1
    stopped = json.loads((ckpts[0] / "trainer_state.json").read_text())["step"]
    assert 3 <= stopped < 400 and f"stopped at step {stopped} " in stops[0]
    assert ckpts[0].name == f"step_{stopped:08d}"
    # both ranks wrote their part of that one checkpoint, and it is intact
    files = json.loads((ckpts[0] / "manifest.json").read_text())["files"]
    for r in (0, 1):
        assert f"pytorch_model/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" in files
    assert is_complete(ckpts[0], verify=True)
    assert metrics(out)[-1]["step"] == stopped
    assert not (out / "hf_model").exists()
