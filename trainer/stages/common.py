"""What every stage does around the loop, written once: the stage skeleton (`open_run` → the stage's own inputs,
model and `loop.Job` → `train`), the output-dir guard, the resolved config, the HF export."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from .. import checkpoint, loop, micro_batch
from ..config import to_dict
from ..distributed import Topology, decided_by_main, make_accelerator, resolve_launch_settings
from ..errors import UserError
from ..optim.param_groups import describe_groups

log = logging.getLogger(__name__)

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "hf_model", "wandb", "curves.png", "param_groups.json")
# sections whose change makes a checkpoint meaningless to continue
_RESUME_MUST_MATCH = ("model", "data")


@dataclass
class Run:
    """A stage's run once its config is resolved, its output dir checked and its engine built."""
    cfg: object  # PretrainConfig | FinetuneConfig, launch settings resolved
    out: Path
    accelerator: object
    topo: Topology
    resume: bool
    overwrite: bool
    engine: dict = field(default_factory=dict)  # make_accelerator's stage-specific arguments
    auto_micro_batch: bool = False  # train.micro_batch_size=auto: the stage probes it (trainer/micro_batch.py)

    def make_engine(self, micro_batch: int, grad_accum: int):
        """(accelerator, topology) for this run's settings with another micro-batch / accumulation."""
        c = self.cfg
        return make_accelerator(precision=c.model.precision, micro_batch=micro_batch, grad_accum=grad_accum,
                                max_grad_norm=c.train.max_grad_norm, deepspeed_config=c.distributed.deepspeed_config,
                                **self.engine)


def open_run(cfg, validate: Callable, resume: bool, overwrite: bool, check_dir: bool = True, **engine) -> Run:
    """The first half of every stage: the global batch split for this world size (trainer/micro_batch.py) →
    the launcher's settings folded into the config (or refused) → the stage's own checks → the output-dir guard
    (read-only: nothing is touched before the inputs load) → on a resume, the checkpoint's global batch → the
    Accelerator / DeepSpeed engine. `check_dir=False`: a run that writes no checkpoint (fine-tuning's
    --eval-only) guards its own output."""
    from ..distributed import init_processes, uses_deepspeed
    world = init_processes(uses_deepspeed(cfg.distributed.deepspeed_config)).num_processes
    train_cfg, auto = micro_batch.resolve(cfg.train, world)
    cfg = resolve_launch_settings(replace(cfg, train=train_cfg))
    validate(cfg)
    out = Path(cfg.output_dir)
    if check_dir:
        check_output_dir(out, to_dict(cfg), resume, overwrite)
        cfg = replace(cfg, train=resume_train_config(out, resume, cfg.train, cfg.distributed.deepspeed_config))
    run = Run(cfg, out, None, None, resume, overwrite, engine, auto)
    run.accelerator, run.topo = run.make_engine(cfg.train.micro_batch_size, cfg.train.grad_accum)
    return run


def train(run: Run, job: loop.Job, groups: list) -> bool:
    """The second half: the inputs loaded without error, so the run may claim its output dir (pick the
    checkpoint to resume, or clear the old run on --overwrite), save the resolved config and its parameter
    groups, and train. True when it finished, False when it stopped early (stop_at_step, preemption)."""
    resume_from = claim_output_dir(run.accelerator, run.out, run.resume, run.overwrite)
    save_resolved_config(run.accelerator, run.out, to_dict(run.cfg))
    if run.accelerator.is_main_process:
        (run.out / "param_groups.json").write_text(json.dumps(describe_groups(groups), indent=1))
    cfg = run.cfg
    loop_cfg = loop.LoopConfig(run.out, cfg.seed, cfg.train, cfg.optim, cfg.wandb, to_dict(cfg))
    return loop.run(job, loop_cfg, run.accelerator, run.topo, resume_from)


def first_difference(a, b, prefix=""):
    """The first key (dotted, sorted order) where two config dicts differ; None when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return prefix.rstrip(".") if a != b else None


def check_output_dir(out: Path, config: dict, resume: bool, overwrite: bool) -> None:
    """Read-only, before anything is loaded: refuse to touch a run the user did not say to resume or replace."""
    holds_run = out.is_dir() and any((out / name).exists() for name in RUN_FILES)
    if resume and holds_run:
        saved = out / "config.yaml"
        if saved.is_file():
            old = yaml.safe_load(saved.read_text()) or {}
            for section in _RESUME_MUST_MATCH:
                key = first_difference(old.get(section), config.get(section), section + ".")
                if key:
                    raise UserError(f"cannot resume {out}: config key '{key}' differs from the saved run "
                                    f"(start a new output_dir, or pass --overwrite to replace the run)")
    elif holds_run and not overwrite:
        raise UserError(f"output dir {out} already holds a run; pass --resume to continue it or --overwrite to "
                        f"replace it")


def claim_output_dir(accelerator, out: Path, resume: bool, overwrite: bool) -> Optional[Path]:
    """Collective, once the inputs have loaded without error: pick the checkpoint to resume from (rank 0 reads
    every file against the manifest's checksums; all ranks get its choice), or clear the old run (--overwrite)."""

    def decide() -> Optional[Path]:
        found = None
        if resume:
            found = checkpoint.latest_complete(out, verify=True)
            if found is None and checkpoint.list_checkpoints(out):
                raise UserError(f"no intact checkpoint in {checkpoint.checkpoint_root(out)} (all torn or "
                                f"corrupted); pass --overwrite to start the run again")
        elif overwrite and out.is_dir():
            for name in RUN_FILES:
                path = out / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        return found

    return decided_by_main(accelerator, decide)


def resume_train_config(out: Path, resume: bool, train, deepspeed_config: Optional[str]):
    """The train section to build the Accelerator with: on a resume with another number of ranks, the
    checkpoint's global batch is kept (see trainer/reshard.py). Collective: the process group is formed first and
    rank 0 reads the checkpoint for every rank (nodes may see a shared filesystem differently)."""
    from ..distributed import init_processes, uses_deepspeed
    from ..reshard import keep_global_batch
    state = init_processes(uses_deepspeed(deepspeed_config))
    return decided_by_main(state, lambda: keep_global_batch(out, resume, train, state.num_processes))


def save_resolved_config(accelerator, out: Path, config: dict) -> None:
    if accelerator.is_main_process:
        tmp = out / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        tmp.rename(out / "config.yaml")


def fp32_state_dict(accelerator, model) -> dict:
    """Collective. The consolidated weights in fp32 (on the main process; other ranks may get an empty dict).

    DeepSpeed under bf16/fp16 holds the model in 16 bits and the fp32 master weights in the optimizer, and
    `get_state_dict` returns the 16-bit copy (transformers 5 would then reload the export as bf16 and the next
    stage would train it without fp32 masters). Trainable parameters are therefore taken from the masters
    (DeepSpeed's `safe_get_full_fp32_param`, collective under ZeRO-1/2/3); the rest (frozen weights, buffers)
    are cast up. Without DeepSpeed the weights already are the fp32 masters (accelerate's autocast)."""
    state_dict = accelerator.get_state_dict(model) or {}  # collective under ZeRO-3 (None off the main process)
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        from deepspeed.utils import safe_get_full_fp32_param
        masters = {}
        for name, p in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
            if p.requires_grad:
                if id(p) not in masters:
                    masters[id(p)] = safe_get_full_fp32_param(p)  # the same order on every rank
                if masters[id(p)] is not None and name in state_dict:
                    state_dict[name] = masters[id(p)].detach().to("cpu", torch.float32)
    return {k: v.float() if torch.is_floating_point(v) else v for k, v in state_dict.items()}


def export_hf(accelerator, model, tokenizer, target: Path, extra: Optional[dict] = None,
              card: Optional[Callable] = None) -> None:
    """Consolidated fp32 `save_pretrained` model + tokenizer (+ `extra` tensors, + the model card: `card(dir)`),
    written as `write_export` writes."""
    state_dict = fp32_state_dict(accelerator, model)
    if accelerator.is_main_process:
        def fill(tmp: Path) -> None:
            accelerator.unwrap_model(model).save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            _declare_fp32(tmp)
            if extra:
                _add_tensors(tmp, extra)
            tokenizer.save_pretrained(str(tmp))
        write_export(target, fill, card)
    accelerator.wait_for_everyone()


def write_export(target: Path, fill: Callable[[Path], None], card: Optional[Callable] = None) -> None:
    """`fill(dir)` writes the model files into a fresh temp dir, `card(dir)` its model card; then the dir is
    renamed into place: nobody reads half an export, and a failed write leaves the previous one whole."""
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    fill(tmp)
    if card is not None:
        card(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def _declare_fp32(model_dir: Path) -> None:
    """save_pretrained records the dtype of the module (bf16 under DeepSpeed bf16), not of the state dict it was
    given; transformers 5 reloads in the recorded dtype, so the config must say what the weights are: fp32."""
    import json
    path = model_dir / "config.json"
    conf = json.loads(path.read_text())
    conf["dtype"] = "float32"
    conf.pop("torch_dtype", None)
    path.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def _add_tensors(model_dir: Path, tensors: dict) -> None:
    from safetensors.torch import load_file, save_file
    single = model_dir / "model.safetensors"
    if single.is_file():
        save_file({**load_file(str(single)), **tensors}, str(single), metadata={"format": "pt"})
        return
    import json
    index_path = model_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(model_dir / "model-extra.safetensors"),
              metadata={"format": "pt"})
    index["weight_map"].update({k: "model-extra.safetensors" for k in tensors})
    index_path.write_text(json.dumps(index, indent=2))


def validate_train_optim(train, optim) -> None:
    """Checks every stage shares: the loop's counts and the learning rate."""
    if optim.lr <= 0:
        raise UserError(f"optim.lr must be > 0, got {optim.lr}")
    for key in ("micro_batch_size", "grad_accum", "log_every"):
        if getattr(train, key) < 1:
            raise UserError(f"train.{key} must be >= 1, got {getattr(train, key)}")
    if train.max_steps == 0 or train.max_steps < -1:
        raise UserError(f"train.max_steps must be > 0, or -1 to run train.epochs; got {train.max_steps}")
