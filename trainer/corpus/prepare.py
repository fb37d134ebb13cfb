"""Tokenize a corpus once and pack it into fixed-length BERT sequences stored as memory-mapped shards.

Layout: `[CLS] doc₁ [SEP] doc₂ [SEP] … [SEP]` — documents are packed back to back, each boundary marked by
[SEP] (RoBERTa's FULL-SENTENCES packing), so >99 % of positions are real tokens even for short documents.
A shard is a raw `(rows, seq_len)` array of uint16/uint32; `meta.json` describes the whole set.
The cache key is (sources, tokenizer content, seq_len, format version): a second run reuses the shards.

One preparer per cache entry, also across nodes sharing the cache dir: the lock file `.<key>.lock` is created with
O_EXCL (atomic on local filesystems and NFS v3+; no flock, which Lustre/NFS mounts may lack) and names its holder
(host, pid, a random tag). Whoever holds it re-checks the cache, builds into a temp dir named by host, pid and a
uuid (unique across hosts and PID-namespaced containers) and renames it into place; the others wait, say whom they
wait for, and read the finished shards. The holder refreshes the lock's mtime every few seconds; a lock unchanged
for `LOCK_STALE_S` (measured on the waiter's own clock: no cross-node clock skew) belongs to a dead preparer and is
taken over. Even a lock broken in error costs only duplicate work: the rename into place is atomic and the loser
uses the winner's shards. Where nodes do not share the cache dir, each node's lock is its own and each prepares."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from ..config import CorpusSource
from ..errors import UserError
from .sources import fingerprint, iter_documents

FORMAT_VERSION = 2
SHARD_ROWS = 1 << 16
DOCS_PER_BATCH = 512
LOCK_STALE_S = 120.0  # a preparer's lock not refreshed for this long is taken over
LOCK_HEARTBEAT_S = 5.0  # how often the holder refreshes it
LOCK_POLL_S = 1.0  # how often a waiter looks


@dataclass
class PreparedCorpus:
    path: Path
    meta: dict

    @property
    def rows(self) -> int:
        return self.meta["rows"]

    def shards(self) -> list[tuple[Path, int]]:
        return [(self.path / name, rows) for name, rows in self.meta["shards"]]


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


def cache_key(src: CorpusSource, tokenizer, seq_len: int) -> str:
    blob = json.dumps([FORMAT_VERSION, fingerprint(src), tokenizer_digest(tokenizer), seq_len], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _batches(docs: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


_worker_tok = None


def _init_worker(tokenizer_dir: str):
    global _worker_tok
    from transformers import AutoTokenizer
    _worker_tok = AutoTokenizer.from_pretrained(tokenizer_dir)


def _encode(tok, batch: list[str]) -> list[list[int]]:
    # split_special_tokens: a literal "[SEP]" in the text is text, not a document boundary
    return tok(batch, add_special_tokens=False, return_attention_mask=False, split_special_tokens=True,
               return_token_type_ids=False, verbose=False)["input_ids"]


def _encode_in_worker(batch: list[str]) -> list[list[int]]:
    return _encode(_worker_tok, batch)


class _Packer:
    """Greedy packer: a stream of token lists in, full `(seq_len,)` rows out."""

    def __init__(self, seq_len: int, cls: int, sep: int, pad: int):
        self.body = seq_len - 2
        self.cls, self.sep, self.pad = cls, sep, pad
        self.buf: list[int] = []

    def add(self, ids: list[int]) -> Iterator[list[int]]:
        if self.buf:
            self.buf.append(self.sep)
        self.buf.extend(ids)
        start, n = 0, len(self.buf)  # consume by offset: linear in the document length, even for books
        while n - start >= self.body:
            row = self.buf[start:start + self.body]
            start += self.body
            if start < n and self.buf[start] == self.sep:  # boundary fell on the row end: the row's [SEP] marks it
                start += 1
            yield [self.cls, *row, self.sep]
        del self.buf[:start]

    def flush(self) -> Iterator[list[int]]:
        if self.buf:
            row = [self.cls, *self.buf, self.sep]
            self.buf = []
            yield row + [self.pad] * (self.body + 2 - len(row))


class _ShardWriter:
    def __init__(self, out: Path, seq_len: int, dtype):
        self.out, self.seq_len, self.dtype = out, seq_len, dtype
        self.rows: list[list[int]] = []
        self.shards: list[list] = []

    def add(self, row: list[int]):
        self.rows.append(row)
        if len(self.rows) == SHARD_ROWS:
            self.flush()

    def flush(self):
        if not self.rows:
            return
        name = f"shard_{len(self.shards):05d}.bin"
        np.asarray(self.rows, dtype=self.dtype).tofile(self.out / name)
        self.shards.append([name, len(self.rows)])
        self.rows = []


def _load(final: Path) -> PreparedCorpus:
    return PreparedCorpus(final, json.loads((final / "meta.json").read_text()))


def _ready(final: Path) -> bool:
    return (final / "meta.json").is_file()


def prepare_corpus(src: CorpusSource, tokenizer, seq_len: int, cache_dir: Optional[Path] = None,
                   num_proc: int = 1, log=print) -> PreparedCorpus:
    """Return the prepared corpus for `src`, building it if the cache does not hold it yet (one preparer per
    cache entry: the others wait for it)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    final = build_once(cache_dir / cache_key(src, tokenizer, seq_len), str(src.path),
                       lambda tmp: _build(src, tokenizer, seq_len, tmp, num_proc, log), log)
    return _load(final)


def build_once(final: Path, what: str, build, log) -> Path:
    """`final`, a cache entry (a directory holding meta.json), built by `build(tmp_dir) -> meta` on one process
    per entry — the others wait for it (see the module docstring) — and renamed into place."""
    if _ready(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = _acquire(final.parent, final, what, log)
    if lock is None:  # another preparer finished while we waited
        return final
    try:
        if _ready(final):  # finished between our first look and the lock
            return final
        tmp = _temp_dir(final, lock.tag)
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


def _owner_tag() -> str:
    """Unique across hosts, PID namespaces (containers reuse pids) and threads: host, pid, uuid4."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"


def _temp_name(final: Path, tag: str) -> Path:
    return final.with_name(f".{final.name}.tmp-{tag}")


def _temp_dir(final: Path, tag: str) -> Path:
    tmp = _temp_name(final, tag)
    tmp.mkdir(parents=True)  # never exist_ok: a temp dir is never shared
    return tmp


class _Lock:
    """An O_EXCL lock file naming its holder; `release` removes it only while it is still ours."""

    def __init__(self, path: Path):
        self.path = path
        self.tag = _owner_tag()
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


def _acquire(cache_dir: Path, final: Path, what: str, log) -> Optional[_Lock]:
    """The lock for `final`, or None once another preparer has finished `final` while we waited."""
    lock = _Lock(cache_dir / f".{final.name}.lock")
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
            log(f"[{socket.gethostname()} pid {os.getpid()}] waiting for {_describe(info)} to finish preparing "
                f"{what} into {final}")
        if now - unchanged_since > LOCK_STALE_S:  # (also a lock whose creator died before writing it)
            log(f"[{socket.gethostname()} pid {os.getpid()}] the corpus lock {lock.path} of {_describe(info)} has "
                f"not been refreshed for {LOCK_STALE_S:.0f}s; taking over its preparation")
            _break(lock.path, current[0])
            if isinstance(info.get("tag"), str) and info["tag"]:
                shutil.rmtree(_temp_name(final, info["tag"]), ignore_errors=True)
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


def _build(src: CorpusSource, tokenizer, seq_len: int, out: Path, num_proc: int, log) -> dict:
    ids = {name: tokenizer.convert_tokens_to_ids(getattr(tokenizer, f"{name}_token"))
           for name in ("cls", "sep", "pad")}
    if any(v is None for v in ids.values()):
        raise UserError("the tokenizer needs [CLS], [SEP] and [PAD] tokens for BERT pre-training")
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    packer, writer = _Packer(seq_len, ids["cls"], ids["sep"], ids["pad"]), _ShardWriter(out, seq_len, dtype)
    docs = n_tokens = 0
    t0 = time.time()
    batches = _batches(iter_documents(src), DOCS_PER_BATCH)
    pool = None
    if num_proc > 1:
        tok_dir = out / "_tokenizer"
        tokenizer.save_pretrained(str(tok_dir))
        pool = mp.get_context("spawn").Pool(num_proc, initializer=_init_worker, initargs=(str(tok_dir),))
        encoded = pool.imap(_encode_in_worker, batches, chunksize=1)
    else:
        encoded = (_encode(tokenizer, b) for b in batches)
    try:
        for batch in encoded:
            for doc in batch:
                docs += 1
                n_tokens += len(doc)
                for row in packer.add(doc):
                    writer.add(row)
        for row in packer.flush():
            writer.add(row)
        writer.flush()
    finally:
        if pool is not None:
            pool.terminate()
            shutil.rmtree(out / "_tokenizer", ignore_errors=True)
    if docs == 0:
        raise UserError(f"corpus {src.path} holds no documents")
    rows = sum(r for _, r in writer.shards)
    elapsed = time.time() - t0
    log(f"prepared {src.path}: {docs} docs, {n_tokens} tokens, {rows} sequences of {seq_len} "
        f"in {elapsed:.1f}s ({n_tokens / max(elapsed, 1e-9):,.0f} tokens/s)")
    return {"format_version": FORMAT_VERSION, "source": str(src.path), "seq_len": seq_len,
            "dtype": np.dtype(dtype).name, "rows": rows, "documents": docs, "doc_tokens": n_tokens,
            "shards": writer.shards, "tokenizer_digest": tokenizer_digest(tokenizer), **{f"{k}_id": v for k, v in ids.items()}}
