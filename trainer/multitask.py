"""Multi-task fine-tuning (MFiT, the paper's §5.3): one shared encoder, a head per task, one task per step.

Every optimizer step draws one task — from (seed, step) only, so every rank runs the same head (under ZeRO-3 a
rank running another head would hang the collectives) and a resumed run draws the same sequence. How often a
task is drawn follows `multitask.sampling`: proportional to its training-set size (the paper's code), uniform,
or p ∝ size^alpha. Each task reads its own length-grouped stream of training batches, which continues where it
left off whenever the task is drawn again. A single-task run is the same with one task that is always drawn."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from .config import MultitaskConfig, TrainConfig
from .text.batching import rank_train_batches


def task_probabilities(sizes: list[int], cfg: MultitaskConfig) -> np.ndarray:
    alpha = {"proportional": 1.0, "uniform": 0.0, "temperature": cfg.alpha}[cfg.sampling]
    weights = np.asarray(sizes, dtype=float) ** alpha
    return weights / weights.sum()


def task_of_step(seed: int, step: int, probs: np.ndarray) -> int:
    """The task of optimizer step `step`: a function of (seed, step) only — identical on every rank."""
    return int(np.random.default_rng([seed, step, 99]).choice(len(probs), p=probs))


class TaskSampler:
    """This rank's micro-batches of a (multi-)task run, and the lr gate that keeps idle heads still.

    `tasks` are `stages.finetune.Task`s (name, lengths["train"], batch()); `trace_dir`, when set, receives
    `rank<r>.txt` with "step task example-indexes" for every micro-batch (train.trace_samples)."""

    def __init__(self, tasks: list, seed: int, multitask: MultitaskConfig, train: TrainConfig, world: int,
                 rank: int, trace_dir: Optional[Path] = None):
        self.tasks, self.seed, self.train, self.world, self.rank = tasks, seed, train, world, rank
        self.trace_dir = trace_dir
        self.probs = task_probabilities([len(t.lengths["train"]) for t in tasks], multitask)
        self.samples_per_step = train.micro_batch_size * world * train.grad_accum

    def task_of(self, step: int) -> int:
        return task_of_step(self.seed, step, self.probs) if len(self.tasks) > 1 else 0

    def batches(self, start: int) -> Iterator[dict]:
        """From global sample `start` (a resume point) on, forever: each task's stream is advanced by the
        steps it was drawn before `start`, so the run continues exactly as if never stopped."""
        step = start // self.samples_per_step
        done = np.bincount([self.task_of(s) for s in range(step)], minlength=len(self.tasks))
        streams = [rank_train_batches(t.lengths["train"], self.train.micro_batch_size, self.world, self.rank,
                                      self.seed + i, int(done[i]) * self.samples_per_step, self.train.grad_accum)
                   for i, t in enumerate(self.tasks)]
        trace = None
        if self.trace_dir is not None:
            self.trace_dir.mkdir(exist_ok=True)
            trace = open(self.trace_dir / f"rank{self.rank}.txt", "a")
        while True:
            i = self.task_of(step)
            t = self.tasks[i]
            for _ in range(self.train.grad_accum):
                idx = next(streams[i])
                if trace:
                    trace.write(f"{step} {t.name} {' '.join(map(str, idx.tolist()))}\n")
                    trace.flush()
                yield {**t.batch("train", idx), "task": t.name}
            step += 1

    def lr_gate(self, groups: list) -> Optional[Callable[[int], list]]:
        """`loop.Job.lr_gate`: the heads of the tasks not drawn for a step get lr 0 in it — their zero gradients
        would otherwise still move them through weight decay and Adam's momentum (ZeRO steps every parameter of
        its partition). None for a single task."""
        if len(self.tasks) == 1:
            return None

        def gate(step: int) -> list:
            drawn = self.tasks[self.task_of(step)].name
            return [1.0 if g["task"] in (None, drawn) else 0.0 for g in groups]

        return gate
