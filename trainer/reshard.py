"""Loading a checkpoint (trainer/checkpoint.py writes them), also on another world size.

`load` restores a checkpoint into the prepared model and optimizer. Two things tie a checkpoint to the number of
processes that wrote it, and both are handled here:
- the global batch (micro x accumulation x ranks): it is kept, so optimizer step k consumes the same samples and
  the LR schedule (a function of the step) continues where it was — the micro-batch / accumulation split is
  re-chosen for the new rank count (`keep_global_batch`, before the Accelerator is built);
- ZeRO-partitioned optimizer state: DeepSpeed's universal-checkpoint conversion (`ds_to_universal`) turns the
  per-rank shards into per-parameter files once (rank 0, atomically, kept next to the shards for the next try),
  and every rank loads its new partition from them (`load_universal`). DeepSpeed's ZeRO-3 universal load gives
  every parameter group the hyper-parameters of group 0; the groups' own values are put back afterwards.
Plain DDP and single-process checkpoints hold whole, unpartitioned state and need no conversion."""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint
from .distributed import decided_by_main
from .errors import UserError

UNIVERSAL = "universal"  # the converted copy inside a checkpoint dir
_DS_TAG = "pytorch_model"  # where accelerate's save_state puts DeepSpeed's files

log = logging.getLogger(__name__)


def _kind(zero_stage: Optional[int]) -> str:
    return "without DeepSpeed" if zero_stage is None else f"with DeepSpeed ZeRO-{zero_stage}"


def load(accelerator, model, optimizer, path: Path, zero_stage: Optional[int]) -> checkpoint.TrainerState:
    """Collective. Restore model/optimizer/RNG from `path`; a checkpoint of another world size is re-partitioned.
    `zero_stage`: this run's DeepSpeed ZeRO stage, None without DeepSpeed. The trainer state and the checkpoint's
    kind are read by the main process and broadcast (see trainer/checkpoint.py)."""

    def inspect() -> tuple[checkpoint.TrainerState, bool]:  # main process: every rank gets the same state and path
        try:
            state = checkpoint.read_state(path)
        except (OSError, ValueError, TypeError) as exc:
            raise UserError(f"cannot read {path / 'trainer_state.json'}: {exc}".splitlines()[0]) from None
        if (path / _DS_TAG).is_dir() != (zero_stage is not None) or state.zero_stage != zero_stage:
            raise UserError(f"checkpoint {path} was written {_kind(state.zero_stage)}; this run is "
                            f"{_kind(zero_stage)} — resume with the same kind of accelerate config")
        return state, state.world_size != accelerator.num_processes and needs_conversion(path)

    state, convert = decided_by_main(accelerator, inspect)
    if convert:
        load_universal(accelerator, model, optimizer, path)
    else:  # same world size, or whole (DDP / single-process) state, which any world size can load
        accelerator.load_state(str(path))
    return state


def keep_global_batch(out: Path, resume: bool, train, world_size: int):
    """`train` with micro_batch_size / grad_accum re-chosen so the global batch of the checkpoint a resume will
    load stays the same on `world_size` ranks. Read-only: runs before the Accelerator exists."""
    ckpt = checkpoint.latest_complete(out, quiet=True) if resume else None  # claim_output_dir warns later
    if ckpt is None:
        return train
    state = checkpoint.read_state(ckpt)
    want = state.global_batch
    if not want or state.world_size == world_size or train.micro_batch_size * train.grad_accum * world_size == want:
        return train
    if want % world_size:
        raise UserError(f"checkpoint {ckpt} was trained with a global batch of {want} samples ({state.world_size} "
                        f"ranks); {world_size} ranks cannot split it evenly — resume on a rank count that divides "
                        f"{want}")
    per_rank = want // world_size
    micro = max(m for m in range(1, min(train.micro_batch_size, per_rank) + 1) if per_rank % m == 0)
    new = replace(train, micro_batch_size=micro, grad_accum=per_rank // micro)
    log.info(f"world size {state.world_size} -> {world_size}: keeping the global batch of {want} samples with "
             f"micro_batch_size {new.micro_batch_size} x grad_accum {new.grad_accum} per rank "
             f"(was {train.micro_batch_size} x {train.grad_accum})")
    return new


def needs_conversion(ckpt: Path) -> bool:
    """A DeepSpeed checkpoint whose optimizer state is split into per-rank shards."""
    return any((ckpt / _DS_TAG).glob("*zero_pp_rank_*_optim_states.pt"))


def universal_copy(accelerator, ckpt: Path) -> Path:
    """Collective. The universal conversion of `ckpt`, made once by rank 0 (temp dir, then rename)."""
    target = ckpt / UNIVERSAL

    def convert() -> None:
        if (target / "done").is_file():
            return
        log.info(f"converting {ckpt} to a DeepSpeed universal checkpoint (world size changed)")
        try:
            _convert(ckpt, target)
        except Exception as exc:  # any converter failure is one line on every rank
            raise UserError(f"cannot convert checkpoint {ckpt} for a new world size: {type(exc).__name__}: "
                            f"{exc}".splitlines()[0]) from None

    decided_by_main(accelerator, convert)
    return target


def _convert(ckpt: Path, target: Path) -> None:
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    tmp = ckpt / f".tmp-{UNIVERSAL}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(ckpt / _DS_TAG), output_folder=str(tmp), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal(args)
    (tmp / "done").write_text("")
    tmp.rename(target)
    (ckpt / "latest_universal").unlink(missing_ok=True)  # the converter's pointer (to the temp name); unused
    checkpoint.fsync_dir(ckpt)


def load_universal(accelerator, model, optimizer, ckpt: Path) -> None:
    """Collective. Load `ckpt` (written by another number of ranks) into the prepared DeepSpeed engine `model`:
    weights, fp32 master copies and Adam moments re-partitioned for this world size."""
    source = universal_copy(accelerator, ckpt)
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    config = model._config  # the engine reads this flag on each load; only this one load is universal
    config.load_universal_checkpoint = True
    try:
        path, _ = model.load_checkpoint(str(ckpt), tag=source.name, load_lr_scheduler_states=False)
    finally:
        config.load_universal_checkpoint = False
    if path is None:
        raise UserError(f"DeepSpeed could not load the universal checkpoint {source}")
    for group, values in zip(optimizer.param_groups, hyper):
        group.update(values)
    for state in optimizer.state.values():  # ZeRO-3's load gives every group one shared `step` tensor, which
        step = state.get("step")            # Adam's in-place increment would then advance once per group
        if torch.is_tensor(step):
            state["step"] = step.clone()
