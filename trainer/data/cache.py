"""The data cache: what is tokenized is built once per cache entry and read by every rank, node, stage and later run.

One preparer per entry, also across nodes sharing the cache dir: the lock file `.<key>.lock` is created with
O_EXCL (atomic on local filesystems and NFS v3+; no flock, which Lustre/NFS mounts may lack) and names its holder
(host, pid, a random tag). Whoever holds it re-checks the cache, builds into a temp dir named by host, pid and a
uuid (unique across hosts and PID-namespaced containers) and renames it into place; the others wait, say whom they
wait for, and read the finished entry. The holder refreshes the lock's mtime every few seconds; a lock unchanged
for `LOCK_STALE_S` (measured on the waiter's own clock: no cross-node clock skew) belongs to a dead preparer and is
taken over. Even a lock broken in error costs only duplicate work: the rename into place is atomic and the loser
uses the winner's entry. Where nodes do not share the cache dir, each node's lock is its own and each prepares."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger(__name__)

LOCK_STALE_S = 120.0  # a preparer's lock not refreshed for this long is taken over
LOCK_HEARTBEAT_S = 5.0  # how often the holder refreshes it
LOCK_POLL_S = 1.0  # how often a waiter looks


def default_cache_dir() -> Path:
    env = os.environ.get("BERT_RECIPE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "bert-recipe" / "corpus"


def tokenizer_digest(tokenizer) -> str:
    """What the tokenizer makes of text: its vocabulary, normaliser, pre-tokenizer, model and added tokens — not
    the call-time truncation / padding settings a saved copy may carry (all-MiniLM-L6-v2's tokenizer.json pads to
    128; our exports do not), which never reach the pieces we store."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _ready(final: Path) -> bool:
    return (final / "meta.json").is_file()


def build_once(final: Path, what: str, build: Callable[[Path], dict]) -> Path:
    """`final`, a cache entry (a directory holding meta.json), built by `build(tmp_dir) -> meta` on one process
    per entry — the others wait for it (see the module docstring) — and renamed into place."""
    if _ready(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = _acquire(final.parent, final, what)
    if lock is None:  # another preparer finished while we waited
        return final
    try:
        if _ready(final):  # finished between our first look and the lock
            return final
        tmp = temp_dir(final, lock.tag)
        try:
            meta = build(tmp)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            try:
                tmp.rename(final)
            except OSError:  # a preparer whose lock was (wrongly) taken over finished first: use theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()
    return final


def owner_tag() -> str:
    """Unique across hosts, PID namespaces (containers reuse pids) and threads: host, pid, uuid4."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def temp_name(final: Path, tag: str) -> Path:
    """Where the preparer tagged `tag` builds `final`: known to a waiter, which removes a dead preparer's."""
    return final.with_name(f".{final.name}.tmp-{tag}")


def temp_dir(final: Path, tag: str) -> Path:
    tmp = temp_name(final, tag)
    tmp.mkdir(parents=True)  # never exist_ok: a temp dir is never shared
    return tmp


class Lock:
    """An O_EXCL lock file naming its holder; `release` removes it only while it is still ours."""

    def __init__(self, path: Path):
        self.path = path
        self.tag = owner_tag()
        self.text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "tag": self.tag,
                                "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        self._stop = threading.Event()
        self._beat: Optional[threading.Thread] = None

    def try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self.text)
            f.flush()
            os.fsync(f.fileno())
        self._beat = threading.Thread(target=self._heartbeat, name="corpus-lock-heartbeat", daemon=True)
        self._beat.start()
        return True

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if _read_lock(self.path)[0] == self.text:
            self.path.unlink(missing_ok=True)


def _read_lock(path: Path) -> tuple[Optional[str], int]:
    """(content, mtime_ns) of a lock file, (None, 0) if there is none. open() revalidates NFS's cached
    attributes (close-to-open), a bare stat() may not."""
    try:
        with open(path) as f:
            return f.read(), os.fstat(f.fileno()).st_mtime_ns
    except (FileNotFoundError, IsADirectoryError):
        return None, 0


def _holder(text: str) -> dict:
    try:
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except ValueError:
        return {}


def _describe(info: dict) -> str:
    if not info:
        return "another process (lock being written)"
    return f"host {info.get('host')} pid {info.get('pid')} (since {info.get('since')})"


def _acquire(cache_dir: Path, final: Path, what: str) -> Optional[Lock]:
    """The lock for `final`, or None once another preparer has finished `final` while we waited.

    Waiting is logged at INFO, shown for the main process only (trainer/logs.py): the main process itself either
    prepares or waits, so the job log always says who prepares; every rank's waits show with `log.all_ranks`.
    Taking over a dead preparer's lock is a WARNING, shown from whichever rank does it."""
    lock = Lock(cache_dir / f".{final.name}.lock")
    seen, unchanged_since, announced = None, time.monotonic(), None
    while not lock.try_create():
        if _ready(final):
            return None
        current = _read_lock(lock.path)
        if current[0] is None:  # released just now: try again at once
            continue
        now = time.monotonic()
        if current != seen:
            seen, unchanged_since = current, now
        info = _holder(current[0])
        if current[0] != announced:
            announced = current[0]
            log.info(f"[{socket.gethostname()} pid {os.getpid()}] waiting for {_describe(info)} to finish preparing "
                     f"{what} into {final}")
        if now - unchanged_since > LOCK_STALE_S:  # (also a lock whose creator died before writing it)
            log.warning(f"[{socket.gethostname()} pid {os.getpid()}] the lock {lock.path} on {what} "
                        f"({_describe(info)}) has not been refreshed for {LOCK_STALE_S:.0f}s; taking over its "
                        f"preparation")
            _break(lock.path, current[0])
            if isinstance(info.get("tag"), str) and info["tag"]:
                shutil.rmtree(temp_name(final, info["tag"]), ignore_errors=True)
            seen = None
            continue
        time.sleep(LOCK_POLL_S)
    return lock


def _break(path: Path, stale_text: str) -> None:
    """Remove the stale lock whose content is `stale_text` — and not a fresh one that replaced it meanwhile."""
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        return
    if _read_lock(aside)[0] != stale_text:  # took a live holder's lock: put it back unless a third took the name
        try:
            os.link(aside, path)
        except OSError:
            pass
    aside.unlink(missing_ok=True)
