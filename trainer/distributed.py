"""Accelerator / DeepSpeed set-up.

- On a machine without GPUs, a gloo process group is formed first (accelerate forms none for DeepSpeed there).
- The DeepSpeed JSON is ours to fill: its "auto" batch size, accumulation, clipping and precision come from the
  run config, and a JSON carrying its own `optimizer`/`scheduler` is refused — it would silently replace our
  parameter groups and schedule.
- The scheduler is never handed to accelerate: the loop sets every group's lr once per optimizer step."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass
class Topology:
    world_size: int
    rank: int
    zero_stage: int  # 0 also for plain DDP / single process
    deepspeed: bool


def load_deepspeed_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"DeepSpeed config not found: {path}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"DeepSpeed config {path} must be a JSON object")
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            raise UserError(f"DeepSpeed config {path} has a '{section}' section; remove it — the trainer builds the "
                            f"optimizer and schedule itself (per-layer lrs) and DeepSpeed's would silently replace them")
    return cfg


def fill_deepspeed_config(ds: dict, micro_batch: int, grad_accum: int, max_grad_norm: float, precision: str,
                          world_size: int) -> dict:
    """Replace "auto" (or missing) batch/accumulation/clipping/precision values with the run config's."""
    ds = json.loads(json.dumps(ds))

    def put(key, value):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise UserError(f"DeepSpeed config sets {key}={ds[key]} but the run config implies {value}; "
                            f"set it to \"auto\"")

    put("train_micro_batch_size_per_gpu", micro_batch)
    put("gradient_accumulation_steps", grad_accum)
    put("train_batch_size", micro_batch * grad_accum * world_size)
    put("gradient_clipping", float(max_grad_norm))
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        wanted = precision == name
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = wanted
        elif bool(section["enabled"]) != wanted:
            raise UserError(f"DeepSpeed config enables {name} but model.precision is {precision}")
    ds.setdefault("zero_optimization", {}).setdefault("stage", 0)
    # accelerate wants to fill zero "auto" sizes from the model; it does so in prepare()
    ds.setdefault("steps_per_print", 1 << 30)
    return ds


def init_processes(use_ds: bool):
    """Form the process group (once per process) and check it spans every launched process."""
    from accelerate import PartialState
    if not torch.cuda.is_available():  # without GPUs accelerate forms no group (DeepSpeed) or a 1-process one (DDP)
        PartialState(backend="gloo") if use_ds else PartialState(cpu=True)
    state = PartialState()
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if state.num_processes != launched:
        raise UserError(f"launched {launched} processes but the process group has {state.num_processes}; "
                        f"check the accelerate config's distributed_type")
    return state


def uses_deepspeed(deepspeed_config: Optional[str]) -> bool:
    return bool(deepspeed_config) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(*, precision: str, micro_batch: int, grad_accum: int, max_grad_norm: float,
                     deepspeed_config: Optional[str]):
    """Return (accelerator, topology). Reads the DS JSON named by the run config or the accelerate config."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    use_ds = uses_deepspeed(deepspeed_config)
    ds_path = deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    ds = load_deepspeed_config(ds_path) if use_ds and ds_path and ds_path != "none" else None
    if use_ds and "WORLD_SIZE" not in os.environ:  # DeepSpeed in one plain process (no launcher)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    cpu = not torch.cuda.is_available()
    state = init_processes(use_ds)
    plugin = None
    zero_stage = 0
    if use_ds:
        if ds is None:  # accelerate config without a JSON file: build from its zero_stage
            ds = {"zero_optimization": {"stage": int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))}}
        ds = fill_deepspeed_config(ds, micro_batch, grad_accum, max_grad_norm, precision, state.num_processes)
        zero_stage = int(ds["zero_optimization"]["stage"])
        if zero_stage == 3:  # needed to export a consolidated HF model at the end
            ds["zero_optimization"].setdefault("stage3_gather_16bit_weights_on_model_save", True)
        os.environ.pop("ACCELERATE_DEEPSPEED_CONFIG_FILE", None)  # the plugin below is the only source of truth
        plugin = DeepSpeedPlugin(hf_ds_config=ds)
    accelerator = Accelerator(mixed_precision=_PRECISION[precision], deepspeed_plugin=plugin, cpu=cpu and not use_ds,
                              gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False)
    return accelerator, Topology(accelerator.num_processes, accelerator.process_index, zero_stage, use_ds)


def decided_by_main(accelerator, decide):
    """Collective. `decide()` runs on the main process only; every rank returns its result, or raises the same
    UserError if it raised one — so no rank is left waiting in a collective while another reports the problem."""
    shared = [None, None]
    if accelerator.is_main_process:
        try:
            shared[0] = decide()
        except UserError as exc:
            shared[1] = str(exc)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        broadcast_object_list(shared)
    if shared[1] is not None:
        raise UserError(shared[1])
    return shared[0]


def reset_between_stages() -> None:
    """Forget the last stage's Accelerator (DeepSpeed plugin, precision, accumulation) but keep the process
    group, so the next stage of a recipe builds its own in the same processes."""
    import gc
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def shutdown() -> None:
    """End of a launch script: tear the process group down cleanly."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # no rank tears its pairs down while another still talks to it
        torch.distributed.destroy_process_group()
