"""Helpers for the fine-tuning benchmarks (finetune_trec.py, finetune_imdb.py): waiting for a quiet machine,
running the trainer as a subprocess, and turning its per-step metrics.jsonl windows into training time.

Timing rule used by both benchmarks (ours and the plain loop alike): every optimizer step is timed on its own —
from the end of the previous step to the end of this one, so fetching/collating the batch is included — and
the figure is Σ examples / Σ seconds over the kept steps. Dropped on both sides: the first `warmup` steps
(allocator / thread-pool warm-up) and the first step after each dev evaluation (in the trainer that step's
window also holds the evaluation and the best-checkpoint save). Start-up, tokenization, evaluation, the final
checkpoint and the export are outside every kept step on both sides.

For the trainer the step times come from metrics.jsonl with `train.log_every=1`: one line per step holding
`tokens_per_second` = real (non-pad) tokens of the step ÷ the step's wall time, so step time = tokens ÷ that
rate, with the step's tokens recomputed from the very batches the stage builds (same tokenizer, truncation,
length-grouped batching; see `trainer_step_tokens`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import _common as C

QUIET_MAX_S = 15 * 60
QUIET_POLL_S = 30


def _own_lineage() -> set[int]:
    """This process, its ancestors and its descendants (never counted as 'other' load)."""
    import psutil
    me = psutil.Process()
    pids = {me.pid, *(p.pid for p in me.parents()), *(p.pid for p in me.children(recursive=True))}
    return pids


def busy_processes() -> list[str]:
    """Other pytest, bench/ or launch/ (trainer runs) python processes running now (not ours)."""
    import psutil
    mine = _own_lineage()
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.info["pid"] in mine:
            continue
        cmd = " ".join(p.info["cmdline"] or [])
        if "python" not in cmd:
            continue
        if "pytest" in cmd or "bench/" in cmd or "launch/" in cmd:
            out.append(f"{p.info['pid']}: {cmd[:160]}")
    return out


def other_cpu(seconds: float = 3.0) -> float:
    """CPU used by processes outside this process tree over `seconds`, in cores."""
    with OtherLoad(interval=seconds) as load:
        time.sleep(seconds + 0.2)
    return load.mean


def repeat_after_quiet(what: str, busy: float, max_load: float) -> None:
    """Say why a timed run (or pair) is thrown away, then wait for a quiet machine before it is repeated."""
    print(f"  {what} discarded: other processes used {busy:.2f} cores on average during it (> {max_load}); "
          f"waiting for a quiet machine and repeating it", flush=True)
    print("  " + wait_quiet(max_load=max_load), flush=True)


def wait_quiet(max_s: float = QUIET_MAX_S, poll_s: float = QUIET_POLL_S, max_load: float = 0.3) -> str:
    """Sleep (poll_s at a time, at most max_s) while other pytest / bench / launch python processes run or other
    processes use more than `max_load` cores (measured over 3 s). → a line saying what happened."""
    t0 = time.time()
    waited = False
    while True:
        busy = busy_processes()
        load = other_cpu() if not busy else None
        if not busy and load <= max_load:
            return (f"machine quiet after waiting {time.time() - t0:.0f} s" if waited else "machine quiet") + \
                f" (other processes' CPU use over 3 s: {load:.2f} cores)"
        if time.time() - t0 >= max_s:
            return (f"WARNING: still busy after {max_s:.0f} s, measuring anyway; "
                    + (" | ".join(busy) if busy else f"other processes' CPU use {load:.2f} cores"))
        if not waited:
            print("waiting for a quiet machine; busy: " + (" | ".join(busy) if busy else f"{load:.2f} cores"),
                  flush=True)
        waited = True
        time.sleep(poll_s)


class OtherLoad:
    """Background sampler: CPU used by processes outside this process tree (in cores), every `interval` s.
    Use as a context manager around a measured run; `.mean` and `.peak` afterwards."""

    def __init__(self, interval: float = 2.0):
        import threading
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _own_cpu(self, last: dict) -> float:
        import psutil
        me = psutil.Process()
        delta = 0.0
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            cur = t.user + t.system
            delta += cur - last.get(p.pid, 0.0 if p.pid != me.pid else cur)
            last[p.pid] = cur
        return delta

    def _run(self):
        import psutil

        def busy():
            t = psutil.cpu_times()
            return t.user + t.system + getattr(t, "nice", 0.0)

        last: dict = {}
        self._own_cpu(last)
        b0, t0 = busy(), time.perf_counter()
        while not self._stop.wait(self.interval):
            own = self._own_cpu(last)
            b1, t1 = busy(), time.perf_counter()
            self.samples.append(max(0.0, (b1 - b0 - own) / (t1 - t0)))
            b0, t0 = b1, t1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0

    @property
    def peak(self) -> float:
        return max(self.samples, default=0.0)

    def describe(self) -> str:
        return f"other load mean {self.mean:.2f} / peak {self.peak:.2f} cores"


def child_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), WANDB_MODE="disabled",
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(k, None)
    return env


def run_cmd(cmd: list[str], threads: int, what: str, log: Optional[Path] = None) -> tuple[float, str, "OtherLoad"]:
    """Run a subprocess in the repo root, sampling other processes' CPU use meanwhile;
    → (wall seconds, stdout, load). Exits with its stderr tail on failure."""
    t0 = time.perf_counter()
    with OtherLoad() as load:
        p = subprocess.run(cmd, env=child_env(threads), capture_output=True, text=True, cwd=C.REPO)
    wall = time.perf_counter() - t0
    if log is not None:
        log.write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    if p.returncode != 0:
        sys.exit(f"{what} failed (rc {p.returncode}):\n{p.stderr[-4000:]}")
    return wall, p.stdout, load


def read_metrics(out_dir: Path) -> tuple[list[dict], list[dict]]:
    """→ (train records, dev records) of metrics.jsonl."""
    recs = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in recs if "split" not in r], [r for r in recs if r.get("split") == "dev"]


def trainer_step_batches(cfg, steps: int) -> tuple[list[int], list[int]]:
    """(real tokens, padded positions = batch x longest) of each of the first `steps` micro-batches the finetune
    stage feeds rank 0 of 1 (same tokenizer, truncation, lengths and length-grouped batching as
    trainer/stages/finetune.py, single task: seed + 0)."""
    from trainer.model import load_tokenizer
    from trainer.text import truncation
    from trainer.text.batching import rank_train_batches
    from trainer.text.data import load_task
    tokenizer = load_tokenizer(cfg.model, "grammar", C.cache_dir())
    splits, _ = load_task(cfg.data, cfg.seed, tokenizer, C.cache_dir(), log=lambda *a: None)
    lengths = truncation.encoded_stats(splits["train"].piece_lengths(), cfg.text)[0]
    tokens, positions = [], []
    for idx in rank_train_batches(lengths, cfg.train.micro_batch_size, 1, 0, cfg.seed, 0):
        tokens.append(int(lengths[idx].sum()))
        positions.append(int(lengths[idx].max()) * len(idx))
        if len(tokens) == steps:
            break
    return tokens, positions


def trainer_step_tokens(cfg, steps: int) -> list[int]:
    """Real tokens of each of the first `steps` micro-batches the finetune stage feeds rank 0 of 1."""
    return trainer_step_batches(cfg, steps)[0]


def trainer_step_seconds(train_recs: list[dict], step_tokens: list[int]) -> list[float]:
    """Per-step wall seconds from log_every=1 metrics lines."""
    steps = [r["step"] for r in train_recs]
    if steps != list(range(1, len(step_tokens) + 1)):
        sys.exit(f"expected one metrics line per step 1..{len(step_tokens)} (train.log_every=1), got steps "
                 f"{steps[:5]}...{steps[-5:]} ({len(steps)} lines)")
    return [tok / r["tokens_per_second"] for tok, r in zip(step_tokens, train_recs)]


def kept_steps(n_steps: int, steps_per_epoch: int, warmup: int, eval_every: Optional[int] = None) -> list[int]:
    """0-based indexes of the timed steps: not the first `warmup`, not the first step after a dev evaluation."""
    every = eval_every or steps_per_epoch
    after_eval = {k for k in range(every, n_steps, every)}  # 0-based index of step k+1 (1-based) = k
    return [i for i in range(n_steps) if i >= warmup and i not in after_eval]


def rate(examples: list[int], seconds: list[float], keep: list[int]) -> tuple[float, float, int]:
    """→ (examples/s, seconds, examples) over the kept steps."""
    ex = sum(examples[i] for i in keep)
    s = sum(seconds[i] for i in keep)
    return ex / s, s, ex


def fmt_pct(x: float) -> str:
    return f"{100 * x:.2f} %"
