"""Preemption: SIGTERM or SIGUSR1 (SLURM's pre-timeout signal) asks the run to stop after the current step,
write a checkpoint and exit 0. With several ranks they agree through a tiny all-reduce, because a signal may
reach the ranks at different steps (or only some of them); it is done only at logging steps, which synchronise
anyway, so the GPU queue is never drained just to look at a flag."""
from __future__ import annotations

import signal

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.signal_name = None
        self._previous = {}
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def agreed(self, accelerator, sync_point: bool) -> bool:
        """True on every rank once any rank got a stop signal. With several ranks it is a collective, taken
        only at `sync_point` steps (the same on all ranks)."""
        if accelerator.num_processes == 1:
            return self.signal_name is not None
        if not sync_point:
            return False
        flag = torch.tensor([1.0 if self.signal_name else 0.0], device=accelerator.device)
        flag = accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
