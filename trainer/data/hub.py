"""Hugging Face hub datasets as a source of records, and what identifies their content for a cache key.

A hub name says nothing about the data behind it (a branch moves), so a cache key holds the commit it resolves
to; a hub-format folder written locally is identified by its files."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, Optional

from ..errors import UserError

log = logging.getLogger(__name__)


def stream_records(spec: str) -> Iterator[tuple[int, dict]]:
    """(row, record) of a hub dataset, streamed (a pre-training corpus need not fit on disk twice); rows count
    from 1. `spec` is `name` or `name::split` (and `name:config::split`)."""
    import datasets
    name, _, split = spec.partition("::")
    name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as exc:  # offline, unknown name, gated …: all user-facing
        raise UserError(f"cannot load hub dataset '{name}' (split {split or 'train'}): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    yield from enumerate(ds, 1)


def resolve_revision(name: str, revision: Optional[str]) -> str:
    """The commit a hub dataset's revision (a branch, tag or commit; default main) points at: asked from the hub,
    or — offline — read from the local HF cache's refs; else the revision as given (logged: a moving branch read
    offline is keyed by its name, so pin a commit for reproducible caches)."""
    rev = revision or "main"
    if len(rev) == 40 and all(c in "0123456789abcdef" for c in rev):
        return rev
    try:
        from huggingface_hub import HfApi, constants
        if not constants.HF_HUB_OFFLINE:
            return HfApi().dataset_info(name, revision=rev, timeout=10).sha
        ref = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}" / "refs" / rev
        if ref.is_file():
            return ref.read_text().strip()
    except Exception:  # offline, unknown name, no hub library: the loader reports what is wrong
        pass
    log.info(f"{name}: revision {rev!r} not resolved to a commit (offline?); the data cache is keyed by that name")
    return rev


def local_files(folder: str) -> list:
    """[relative path, size, mtime_ns] of each file of a hub-format dataset written locally (data files + README),
    sorted; the `datasets` library's own `.cache` inside it is not content."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and ".cache" not in p.parts)
    return [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
