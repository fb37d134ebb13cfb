"""Run a launch line so that a stop signal sent to it ends the job with a checkpoint and exit code 0.

    python -m trainer.entry.supervise accelerate launch --config_file CFG -m trainer.entry.pretrain --config RUN.yaml ...
    (or python launch/supervise.py …)

Why: SIGTERM sent to `accelerate launch` itself (what `kill`, `timeout` and a Kubernetes pod shutdown do) reaches
torch elastic's agent. It passes the signal on to the ranks, which checkpoint and exit 0 (trainer/preemption.py),
but the agent then re-raises it: a SignalException traceback and exit code 1, so the job is recorded as failed.
It also SIGKILLs the ranks 30 s after passing the signal on, which can cut a checkpoint write short.

How: the command runs in its own session, so signals meant for the terminal or the process group reach only
this supervisor. SIGTERM, SIGINT or SIGUSR1 here becomes SIGUSR1 (the trainer's checkpoint-and-exit-0 signal)
to the ranks, not to the launcher, which then sees every rank succeed and exits 0. A further signal is passed
on again; nothing is ever killed. The exit code is the command's (128 + N if signal N killed it). Killing this
supervisor with SIGKILL leaves the job running.

The ranks are the command's descendants that catch SIGUSR1. The launcher does not (torch elastic handles
SIGTERM, SIGINT, SIGHUP and SIGQUIT; under SLURM trainer/entry/node_command.py ignores SIGUSR1), nor does a rank
starting up: SIGUSR1 before the trainer's handler is installed would kill it, so the signal waits until the
handler is there.
DataLoader workers forked from a rank catch it too and get it harmlessly; workers started afresh (spawn) do not
and are left alone.
"""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import psutil

from trainer import logs

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def catches_usr1(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(caught >> (signal.SIGUSR1 - 1) & 1)


def ranks(launcher_pid: int) -> list[psutil.Process]:
    found = []
    try:
        descendants = psutil.Process(launcher_pid).children(recursive=True)
    except psutil.Error:  # the command has just exited
        return found
    for p in descendants:
        try:
            if catches_usr1(p.pid):
                found.append(p)
        except OSError:  # exited meanwhile
            pass
    return found


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m trainer.entry.supervise <launch command> [args...]", file=sys.stderr)
        return 2
    logs.setup()  # the command's own arguments are the launch line's: no log flags of its own
    received: list[str] = []
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, frame: received.append(signal.Signals(signum).name))
    try:
        child = subprocess.Popen(argv, start_new_session=True)
    except OSError as exc:
        print(f"error: cannot run {argv[0]!r}: {exc}", file=sys.stderr)
        return 127
    told: set[int] = set()  # ranks that got SIGUSR1 for the latest signal
    handled = 0
    while child.poll() is None:
        if len(received) > handled:
            for name in received[handled:]:
                log.warning(f"supervise: {name}: asking the ranks to checkpoint and stop")
            handled = len(received)
            told.clear()
        if received:
            for rank in ranks(child.pid):
                if rank.pid not in told:
                    try:
                        rank.send_signal(signal.SIGUSR1)
                    except psutil.NoSuchProcess:
                        pass
                    told.add(rank.pid)
        time.sleep(0.2)
    for name in received[handled:]:  # arrived while the job was ending
        log.warning(f"supervise: {name}: the job has already ended")
    return child.returncode if child.returncode >= 0 else 128 - child.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
