"""The global batch as the config says it, and `train.micro_batch_size: auto` — the largest micro-batch that fits.

`train.global_batch_size` (samples per optimizer step, all ranks together) fixes what the optimizer sees; the
micro-batch (per rank, per forward) and the accumulation are derived from it, so a run keeps its global batch —
and with it the examples of every optimizer step (`text.batching`) — on any number of ranks and any device.

`auto` tries it: on CUDA, for each candidate micro-batch (the divisors of global / world, largest first), a
fresh model and optimizer are prepared by the run's own engine (DDP, or DeepSpeed at the run's ZeRO stage and
offload) and take two optimizer steps at lr 0 on the *longest* examples the run will see (the prepared data
knows every example's length after truncation; a multi-task run tries every task's longest batch) — the second
step with the optimizer state resident, as in steady training. An out-of-memory error backs off to the next
candidate; the ranks agree on the largest size that fit on every one of them (an all-reduce of the outcome).
The probe's models are thrown away; the run then builds its own.

Why by hand: accelerate's `find_executable_batch_size` reruns a whole function with a halved batch but neither
keeps a global batch nor rebuilds a DeepSpeed engine (HF Trainer refuses `auto_find_batch_size` under DeepSpeed),
and DeepSpeed has no probe of its own.

Ranks agree safely because they fail alike: under DDP the probe runs the wrapped module itself (no buffer
broadcast, no gradient all-reduce: no collective in the probe, so any rank may fail alone); under DeepSpeed every rank runs the same shapes on equal partitions,
so an out-of-memory error strikes every rank at the same operation. (A GPU shared with another process could
break that symmetry; then the failing collective waits for the process group's timeout.)

On CPU there is no device memory to probe: `auto` takes the whole per-rank share, global / world, with no
accumulation (logged). The retry logic is tested on CPU through BERT_RECIPE_FAKE_OOM_ABOVE ("8", or one value
per rank: "16,8"): a probe step above that size raises an out-of-memory error, and the probe runs as on CUDA."""
from __future__ import annotations

import gc
import logging
import os
from dataclasses import replace
from typing import Callable, Optional

import torch

from .errors import UserError

log = logging.getLogger(__name__)

FAKE_OOM = "BERT_RECIPE_FAKE_OOM_ABOVE"


def resolve(train, world: int):
    """`train` with integer micro_batch_size and grad_accum for `world` ranks (an `auto` micro-batch starts as the
    whole per-rank share until the probe picks it) — and whether the probe is needed."""
    auto = train.micro_batch_size == "auto"
    if isinstance(train.micro_batch_size, str) and not auto:
        raise UserError(f"train.micro_batch_size must be an integer >= 1 or auto, got {train.micro_batch_size!r}")
    g = train.global_batch_size
    if g is None:
        if auto:
            raise UserError("train.micro_batch_size=auto needs train.global_batch_size (the samples per optimizer "
                            "step, all ranks together, that the probe keeps)")
        return train, False
    if g < 1 or g % world:
        raise UserError(f"train.global_batch_size={g} must be a positive multiple of the {world} rank(s)")
    per_rank = g // world
    if auto:
        if train.grad_accum is not None:
            raise UserError(f"train.micro_batch_size=auto derives the accumulation from train.global_batch_size; "
                            f"remove train.grad_accum={train.grad_accum}")
        return replace(train, micro_batch_size=per_rank, grad_accum=1), True
    micro = train.micro_batch_size
    if per_rank % micro:
        raise UserError(f"train.global_batch_size={g} on {world} rank(s) is {per_rank} per rank, which "
                        f"train.micro_batch_size={micro} does not divide")
    if train.grad_accum not in (None, per_rank // micro):
        raise UserError(f"train.grad_accum={train.grad_accum} contradicts train.global_batch_size={g} "
                        f"(= {micro} x {per_rank // micro} x {world} ranks); set one of them")
    return replace(train, grad_accum=per_rank // micro), False


def candidates(per_rank: int) -> list[int]:
    return [m for m in range(per_rank, 0, -1) if per_rank % m == 0]


def _fake_limit(rank: int) -> Optional[int]:
    raw = os.environ.get(FAKE_OOM, "").strip()
    if not raw:
        return None
    values = [int(v) for v in raw.split(",")]
    return values[min(rank, len(values) - 1)]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def choose(per_rank: int, attempt: Callable[[int], None], agree: Callable[[bool], bool]) -> tuple[int, list]:
    """The largest candidate micro-batch for which `attempt(m)` raised no out-of-memory error on any rank
    (`agree(ok)` → ok on every rank); → (micro-batch, [(size, fitted)…]). Collective."""
    tried = []
    for m in candidates(per_rank):
        try:
            attempt(m)
            ok = True
        except Exception as exc:  # noqa: BLE001 — anything but an OOM is re-raised below
            if not _is_oom(exc):
                raise
            ok = False
        finally:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        ok = agree(ok)
        tried.append((m, ok))
        log.info(f"micro-batch probe: {m} {'fits' if ok else 'does not fit'}"
                 + ("" if ok else " (out of memory on at least one rank)"))
        if ok:
            return m, tried
    raise UserError("train.micro_batch_size=auto: even a micro-batch of 1 runs out of memory on the longest "
                    "examples; shorten text.max_len, use a ZeRO stage that partitions more (or offload), or bf16")


def should_probe() -> bool:
    return torch.cuda.is_available() or bool(os.environ.get(FAKE_OOM))


def apply(train, micro: int):
    per_rank = train.micro_batch_size * train.grad_accum
    return replace(train, micro_batch_size=micro, grad_accum=per_rank // micro)


def probe(run, build: Callable[[], tuple], batches_of: Callable[[int], list]):
    """`run` (stages.common.Run) with the micro-batch `auto` chose and its accumulation, on a new engine
    (`run.make_engine`: the run's own settings with another micro-batch).

    build() → (model, optimizer) as the run would train them; batches_of(m) → the probe's micro-batches of m
    examples (the longest). Collective."""
    import torch.distributed as dist

    from .distributed import reset_between_stages
    train = run.cfg.train
    per_rank = train.micro_batch_size * train.grad_accum
    if not should_probe():
        log.info(f"train.micro_batch_size=auto on CPU: no device memory to probe, so the whole per-rank share "
                 f"(global {train.global_batch_size} / {run.topo.world_size} ranks) = {per_rank}, no accumulation")
        return run
    device = run.accelerator.device
    limit = _fake_limit(run.topo.rank)
    if run.topo.deepspeed and len(set(os.environ.get(FAKE_OOM, "").split(","))) > 1:
        raise UserError(f"{FAKE_OOM} with one value per rank needs a probe without collectives (single process or "
                        f"DDP); under DeepSpeed every rank must fail alike — give one value")

    def attempt(m: int) -> None:
        reset_between_stages()
        accelerator, topo = run.make_engine(m, 1)  # accumulation 1: the optimizer steps after every backward
        model, optimizer = build()
        for group in optimizer.param_groups:
            group["lr"] = 0.0  # (the probe's model is thrown away; lr 0 keeps even its steps from moving it)
        model, optimizer = accelerator.prepare(model, optimizer)
        # DDP: the module itself, so no collective runs in the probe (buffer broadcast, gradient all-reduce)
        net = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        try:  # (every rank has built its engine — collectives — before an injected failure)
            if limit is not None and m > limit:
                raise torch.OutOfMemoryError(f"out of memory (injected by {FAKE_OOM}: {m} > {limit})")
            for _ in range(2):  # the second step with Adam's state resident, as in steady training
                for batch in batches_of(m):
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    loss = net(**batch)[0]
                    if topo.deepspeed:
                        accelerator.backward(loss)  # (DeepSpeed's backward also steps its optimizer)
                    else:
                        loss.backward()
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
        finally:
            if hasattr(model, "destroy"):
                model.destroy()  # a DeepSpeed engine's hooks and buffers
            del net, model, optimizer, accelerator

    def agree(ok: bool) -> bool:
        if not dist.is_initialized():
            return ok
        flag = torch.tensor([int(ok)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    micro, tried = choose(per_rank, attempt, agree)
    reset_between_stages()
    new = apply(train, micro)
    accelerator, topo = run.make_engine(new.micro_batch_size, new.grad_accum)
    log.info(f"train.micro_batch_size=auto: {micro} per rank x grad_accum {new.grad_accum} x {topo.world_size} "
             f"rank(s) = the global batch of {train.global_batch_size} (tried "
             + ", ".join(f"{m}{'' if ok else ' ✗'}" for m, ok in tried) + ")")
    return replace(run, cfg=replace(run.cfg, train=new), accelerator=accelerator, topo=topo)
