"""Accelerator / DeepSpeed set-up.

- On a machine without GPUs, a gloo process group is formed first (accelerate forms none for DeepSpeed there).
- The DeepSpeed JSON is ours to fill: its "auto" batch size, accumulation, clipping and precision come from the
  run config, and a JSON carrying its own `optimizer`/`scheduler` is refused — it would silently replace our
  parameter groups and schedule.
- The scheduler is never handed to accelerate: the loop sets every group's lr once per optimizer step."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .errors import UserError

_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

log = logging.getLogger(__name__)


@dataclass
class Topology:
    world_size: int
    rank: int
    zero_stage: int  # 0 also for plain DDP / single process
    deepspeed: bool
    precision: str = "fp32"


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
    if use_ds and "WORLD_SIZE" not in os.environ:  # DeepSpeed in one plain process (no launcher)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
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


def _launcher_value(name: str) -> Optional[str]:
    """An `accelerate launch` setting (its config file or flags) as the launcher passed it to the ranks."""
    value = os.environ.get(name, "").strip().lower()
    return value if value not in ("", "auto", "none") else None


def _adopt(key: str, ours, theirs, launcher_name: str, default, quiet: bool):
    """`ours` None/"auto": take the launcher's value (logged) or the default; both set and different: refuse."""
    if theirs is None:
        return default if ours in (None, "auto") else ours
    if ours in (None, "auto"):
        if not quiet:
            log.info(f"{key}={theirs} (from accelerate's {launcher_name})")
        return theirs
    if ours != theirs:
        raise UserError(f"accelerate's {launcher_name}={theirs} contradicts {key}={ours}; make them agree or "
                        f"remove one")
    return ours


def resolve_launch_settings(cfg, quiet: bool = False):
    """The run config with `auto` precision / unset accumulation and clipping taken from `accelerate launch`
    (`accelerate config` answers, or --mixed_precision / --gradient_accumulation_steps / --gradient_clipping),
    and a contradiction between the two refused in one line — never silently dropped. accelerate sets
    ACCELERATE_MIXED_PRECISION=no when nothing was asked for, so "no" counts as unset. Each value taken from the
    launcher is a line in the job log, unless `quiet` (the config recomputed for a check, not for a run)."""
    from dataclasses import replace
    mp = _launcher_value("ACCELERATE_MIXED_PRECISION")
    if mp not in (None, "no", "bf16", "fp16"):
        raise UserError(f"accelerate's mixed_precision={mp} is not supported; use bf16, fp16 or no")
    precision = _adopt("model.precision", cfg.model.precision, None if mp == "no" else mp, "mixed_precision",
                       "fp32", quiet)
    ga = _launcher_value("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    grad_accum = _adopt("train.grad_accum", cfg.train.grad_accum, int(ga) if ga else None,
                        "gradient_accumulation_steps", 1, quiet)
    clip = _launcher_value("ACCELERATE_GRADIENT_CLIPPING")
    max_grad_norm = _adopt("train.max_grad_norm", cfg.train.max_grad_norm, float(clip) if clip else None,
                           "gradient_clipping", 1.0, quiet)
    return replace(cfg, model=replace(cfg.model, precision=precision),
                   train=replace(cfg.train, grad_accum=grad_accum, max_grad_norm=max_grad_norm))


_ZERO_FROM_LAUNCHER = {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "stage",
                       "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "offload_optimizer",
                       "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "offload_param"}


def _deepspeed_dict(ds_path: Optional[str]) -> dict:
    """The DeepSpeed config: the JSON (run config or accelerate config), or — for an accelerate config made
    without a JSON — its zero_stage and offload devices. A JSON together with launcher ZeRO settings that
    contradict it is refused (DeepSpeed would run the JSON and drop the others)."""
    launcher = {key: _launcher_value(env) for env, key in _ZERO_FROM_LAUNCHER.items()}
    if ds_path:
        ds = load_deepspeed_config(ds_path)
        zero = ds.get("zero_optimization", {})
        found = {"stage": str(zero.get("stage", 0)),
                 "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none"),
                 "offload_param": zero.get("offload_param", {}).get("device", "none")}
        for key, value in launcher.items():
            if value is not None and value != "none" and str(found[key]).lower() != value:
                raise UserError(f"accelerate's {key}={value} contradicts {ds_path} ({key}={found[key]}); set it in "
                                f"one place")
        return ds
    zero = {"stage": int(launcher["stage"] or 2)}
    for key in ("offload_optimizer", "offload_param"):
        if launcher[key] not in (None, "none"):
            zero[key] = {"device": launcher[key]}
    return {"zero_optimization": zero}


def make_accelerator(*, precision: str, micro_batch: int, grad_accum: int, max_grad_norm: float,
                     deepspeed_config: Optional[str], find_unused_parameters: bool = False):
    """Return (accelerator, topology). Reads the DS JSON named by the run config or the accelerate config.

    `find_unused_parameters`: under DDP, parameters a step may not use (heads of tasks not drawn, layers above
    the one read) are marked ready by the reducer instead of stalling it."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedDataParallelKwargs, GradientAccumulationPlugin

    use_ds = uses_deepspeed(deepspeed_config)
    # read, never popped: every stage of a recipe (and a requeued one) runs under the setup it was launched with
    ds_path = deepspeed_config or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    ds_path = None if ds_path == "none" else ds_path
    cpu = not torch.cuda.is_available()
    if cpu and precision == "fp16":  # both DeepSpeed's CPU accelerator and accelerate's CPU autocast refuse it
        raise UserError("model.precision=fp16 needs a GPU; on CPU use bf16 or fp32")
    ds = _deepspeed_dict(ds_path) if use_ds else None
    state = init_processes(use_ds)
    plugin = None
    zero_stage = 0
    if use_ds:
        ds = fill_deepspeed_config(ds, micro_batch, grad_accum, max_grad_norm, precision, state.num_processes)
        zero = ds["zero_optimization"]
        zero_stage = int(zero["stage"])
        if zero_stage == 3:  # needed to export a consolidated HF model at the end
            zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
        plugin = DeepSpeedPlugin(hf_ds_config=ds)
        if _launcher_value("ACCELERATE_DEEPSPEED_ZERO3_INIT") == "true":
            log.info("zero3_init_flag ignored: models are built whole on every rank and partitioned in prepare()")
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else None
    accelerator = Accelerator(mixed_precision=_PRECISION[precision], deepspeed_plugin=plugin, cpu=cpu and not use_ds,
                              gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=grad_accum),
                              step_scheduler_with_optimizer=False, kwargs_handlers=handlers)
    return accelerator, Topology(accelerator.num_processes, accelerator.process_index, zero_stage, use_ds,
                                 precision)


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
