"""Atomic, sharded checkpoints: accelerate/DeepSpeed state + the trainer's own state.

A checkpoint is written into `checkpoints/.tmp-step_N`, then `manifest.json` (every file, its size and SHA-256;
the ranks hash the files between them) is written last and the directory is renamed to `checkpoints/step_N`.
A directory without a manifest, or whose files differ from it in size (torn write) or content (corruption), is
never resumed from. The output dir must be on a filesystem all ranks share (as DeepSpeed assumes). Loading one
back, on the same or another number of ranks, is trainer/reshard.py's (`reshard.load`), which builds on this module.

What ranks must agree on is read from disk by the main process only and broadcast (`decided_by_main`), never
read by each rank on its own from a shared filesystem (NFS) whose caches may disagree between nodes: the file list
the ranks split for hashing, whether `best` is complete (and, in reshard.py, the trainer state read on load); pruning
and the resume source (`stages/common.claim_output_dir`) are the main process's alone."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .distributed import decided_by_main
from .errors import UserError

PREFIX = "step_"
BEST = "best"  # the best-on-dev checkpoint (fine-tuning); never pruned, never resumed from

log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    samples: int = 0  # global samples consumed (stream position)
    wandb_id: Optional[str] = None
    world_size: int = 1
    global_batch: int = 0  # samples per optimizer step (micro x accumulation x ranks); kept on another world size
    zero_stage: Optional[int] = None  # None: not DeepSpeed
    extra: dict = field(default_factory=dict)


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _files(path: Path) -> list[Path]:
    return [p for p in sorted(path.rglob("*")) if p.is_file()]


def manifest_entries(root: Path, files: list[Path]) -> dict:
    return {str(f.relative_to(root)): {"size": f.stat().st_size, "sha256": _sha256(f)} for f in files}


def _write_manifest(path: Path, files: dict) -> None:
    tmp = path / "manifest.json.tmp"
    tmp.write_text(json.dumps({"files": files}, indent=1))
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    tmp.rename(path / "manifest.json")


def is_complete(path: Path, verify: bool = False) -> bool:
    """Every manifest file present with its size; with `verify`, also its SHA-256 (reads everything)."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        files = json.loads(manifest.read_text())["files"]
        for name, entry in files.items():
            f = path / name
            if not f.is_file() or f.stat().st_size != entry["size"] or (verify and _sha256(f) != entry["sha256"]):
                return False
        return True
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def is_complete_on_main(accelerator, path: Path, verify: bool = False) -> bool:
    """Collective: `is_complete(path)` as the main process sees it, on every rank (so all of them take the same
    branch, e.g. whether to load `best`)."""
    return decided_by_main(accelerator, lambda: is_complete(path, verify))


def read_state(path: Path) -> TrainerState:
    return TrainerState(**json.loads((path / "trainer_state.json").read_text()))


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(dirs, key=lambda p: int(p.name[len(PREFIX):]))


def latest_complete(output_dir: Path, verify: bool = False, quiet: bool = False) -> Optional[Path]:
    """The newest complete checkpoint; each newer torn or corrupted one is a warning in the job log, unless
    `quiet` (a look-ahead whose caller does not act on the skipped ones, or warns about them itself later)."""
    for path in reversed(list_checkpoints(output_dir)):
        if is_complete(path, verify):
            return path
        if not quiet:
            log.warning(f"checkpoint {path} is incomplete or corrupted; falling back to an earlier one")
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
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
    accelerator.wait_for_everyone()
    # the main process lists the files; each rank hashes every world_size-th file of *that* list
    names = decided_by_main(accelerator, lambda: _listing(tmp))
    mine = _hash_share(tmp, names[accelerator.process_index::accelerator.num_processes], accelerator.process_index)
    from accelerate.utils import gather_object
    hashed = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
    errors = [part["error"] for part in hashed if part["error"]]
    if errors:  # every rank holds every part: all raise the same error, none is left waiting
        raise UserError(f"cannot write the manifest of checkpoint {tmp}: {errors[0]}")
    if accelerator.is_main_process:
        _write_manifest(tmp, {k: v for part in hashed for k, v in sorted(part["files"].items())})
        if final.exists():  # re-saving the same step, or a new best: the old one goes only once the new is whole
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        fsync_dir(root)
        _prune(output_dir, keep_last)
    accelerator.wait_for_everyone()
    return final


def _listing(root: Path) -> list[str]:
    try:
        return [str(f.relative_to(root)) for f in _files(root)]
    except OSError as exc:
        raise UserError(f"cannot list checkpoint {root}: {exc}".splitlines()[0]) from None


def _hash_share(root: Path, names: list[str], rank: int) -> dict:
    """This rank's part of the manifest: {"files": entries, "error": None}, or the first file it cannot read."""
    try:
        return {"files": manifest_entries(root, [root / n for n in names]), "error": None}
    except OSError as exc:
        return {"files": {}, "error": f"rank {rank} cannot read {exc.filename or root}: {exc.strerror or exc}"}


def _prune(output_dir: Path, keep_last: int) -> None:  # main process only
    complete = [p for p in list_checkpoints(output_dir) if is_complete(p)]
    for old in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
