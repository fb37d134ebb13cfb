"""What every stage does around the loop: guard the output dir, save the resolved config, export the HF model."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import yaml

from .. import checkpoint
from ..errors import UserError

RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "hf_model", "wandb")
# sections whose change makes a checkpoint meaningless to continue
_RESUME_MUST_MATCH = ("model", "data")


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _diff(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    return prefix.rstrip(".") if a != b else None


def prepare_output_dir(accelerator, out: Path, config: dict, resume: bool, overwrite: bool) -> Optional[Path]:
    """Decide (identically on every rank) whether this run starts fresh or resumes; never destroy a run silently.

    Returns the checkpoint to resume from, or None."""
    holds_run = out.is_dir() and any((out / name).exists() for name in RUN_FILES)
    resume_from = None
    if resume and holds_run:
        saved = out / "config.yaml"
        if saved.is_file():
            old = yaml.safe_load(saved.read_text()) or {}
            for section in _RESUME_MUST_MATCH:
                key = _diff(old.get(section), config.get(section), section + ".")
                if key:
                    raise UserError(f"cannot resume {out}: config key '{key}' differs from the saved run "
                                    f"(start a new output_dir, or pass --overwrite to replace the run)")
        resume_from = checkpoint.latest_complete(out, log=accelerator.print)
    elif holds_run and not overwrite:
        raise UserError(f"output dir {out} already holds a run; pass --resume to continue it or --overwrite to "
                        f"replace it")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if holds_run and overwrite and not resume:
            for name in RUN_FILES:
                path = out / name
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return resume_from


def save_resolved_config(accelerator, out: Path, config: dict) -> None:
    if accelerator.is_main_process:
        tmp = out / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
        tmp.rename(out / "config.yaml")


def export_hf(accelerator, model, tokenizer, target: Path) -> None:
    """Consolidated `save_pretrained` model + tokenizer, written to a temp dir and renamed into place."""
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3
    if accelerator.is_main_process:
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    accelerator.wait_for_everyone()


def validate_train_optim(train, optim) -> None:
    """Checks every stage shares: the loop's counts and the learning rate."""
    if optim.lr <= 0:
        raise UserError(f"optim.lr must be > 0, got {optim.lr}")
    for key in ("micro_batch_size", "grad_accum", "log_every"):
        if getattr(train, key) < 1:
            raise UserError(f"train.{key} must be >= 1, got {getattr(train, key)}")
    if train.max_steps == 0 or train.max_steps < -1:
        raise UserError(f"train.max_steps must be > 0, or -1 to run train.epochs; got {train.max_steps}")
