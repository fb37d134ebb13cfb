"""Atomic, sharded checkpoints: accelerate/DeepSpeed state + the trainer's own state.

A checkpoint is written into `checkpoints/.tmp-step_N`, then `manifest.json` (every file and its size) is written
last and the directory is renamed to `checkpoints/step_N`. A directory without a valid manifest is torn and never
resumed from. The output dir must be on a filesystem all ranks share (as DeepSpeed assumes)."""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .errors import UserError

PREFIX = "step_"
BEST = "best"  # the best-on-dev checkpoint (fine-tuning); never pruned, never resumed from


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    samples: int = 0  # global samples consumed (stream position)
    wandb_id: Optional[str] = None
    world_size: int = 1
    extra: dict = field(default_factory=dict)


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def _write_manifest(path: Path) -> None:
    files = {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    tmp = path / "manifest.json.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.rename(path / "manifest.json")


def is_complete(path: Path) -> bool:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
        return all((path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]))


def latest_complete(output_dir: Path, log=print) -> Optional[Path]:
    for path in reversed(list_checkpoints(output_dir)):
        if is_complete(path):
            return path
        log(f"warning: checkpoint {path} is incomplete or corrupted; falling back to an earlier one")
    return None


def save(accelerator, output_dir: Path, state: TrainerState, keep_last: int, name: Optional[str] = None) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint dir (`step_N`, or `name`)."""
    root = checkpoint_root(output_dir)
    final = root / (name or f"{PREFIX}{state.step:08d}")
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
        _write_manifest(tmp)
        if final.exists():  # re-saving the same step, or a new best: the old one goes only once the new is whole
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
        _prune(output_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def _prune(output_dir: Path, keep_last: int) -> None:
    complete = [p for p in list_checkpoints(output_dir) if is_complete(p)]
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load(accelerator, path: Path) -> TrainerState:
    state = TrainerState(**json.loads((path / "trainer_state.json").read_text()))
    if state.world_size != accelerator.num_processes:
        raise UserError(f"checkpoint {path} was written by {state.world_size} processes; this run has "
                        f"{accelerator.num_processes}. Resume with the same number of processes")
    accelerator.load_state(str(path))
    return state
