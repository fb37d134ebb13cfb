"""Tokenize a corpus once and pack it into fixed-length BERT sequences stored as memory-mapped shards.

Layout: `[CLS] doc₁ [SEP] doc₂ [SEP] … [SEP]` — documents are packed back to back, each boundary marked by
[SEP] (RoBERTa's FULL-SENTENCES packing), so >99 % of positions are real tokens even for short documents.
A shard is a raw `(rows, seq_len)` array of uint16/uint32; `meta.json` describes the whole set.
The cache key is (sources, tokenizer content, seq_len, format version): a second run reuses the shards, and one
process per cache entry builds it while the others wait (trainer/data/cache.py).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from ..config import CorpusSource
from ..data.cache import build_once, default_cache_dir, tokenizer_digest
from ..data.tokenize_pool import TokenizePool
from ..errors import UserError
from .sources import fingerprint, iter_documents

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
SHARD_ROWS = 1 << 16
DOCS_PER_BATCH = 512


@dataclass
class PreparedCorpus:
    path: Path
    meta: dict

    @property
    def rows(self) -> int:
        return self.meta["rows"]

    def shards(self) -> list[tuple[Path, int]]:
        return [(self.path / name, rows) for name, rows in self.meta["shards"]]


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


def prepare_corpus(src: CorpusSource, tokenizer, seq_len: int, cache_dir: Optional[Path] = None,
                   num_proc: int = 1) -> PreparedCorpus:
    """Return the prepared corpus for `src`, building it if the cache does not hold it yet (one preparer per
    cache entry: the others wait for it)."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    final = build_once(cache_dir / cache_key(src, tokenizer, seq_len), str(src.path),
                       lambda tmp: _build(src, tokenizer, seq_len, tmp, num_proc))
    return _load(final)


def _build(src: CorpusSource, tokenizer, seq_len: int, out: Path, num_proc: int) -> dict:
    ids = {name: tokenizer.convert_tokens_to_ids(getattr(tokenizer, f"{name}_token"))
           for name in ("cls", "sep", "pad")}
    if any(v is None for v in ids.values()):
        raise UserError("the tokenizer needs [CLS], [SEP] and [PAD] tokens for BERT pre-training")
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    packer, writer = _Packer(seq_len, ids["cls"], ids["sep"], ids["pad"]), _ShardWriter(out, seq_len, dtype)
    docs = n_tokens = 0
    t0 = time.time()
    with TokenizePool(tokenizer, num_proc, out) as pool:
        for _, pieces in pool.map(_batches(iter_documents(src), DOCS_PER_BATCH)):
            for doc in pieces:
                docs += 1
                n_tokens += len(doc)
                for row in packer.add(doc):
                    writer.add(row)
    for row in packer.flush():
        writer.add(row)
    writer.flush()
    if docs == 0:
        raise UserError(f"corpus {src.path} holds no documents")
    rows = sum(r for _, r in writer.shards)
    elapsed = time.time() - t0
    log.info(f"prepared {src.path}: {docs} docs, {n_tokens} tokens, {rows} sequences of {seq_len} "
             f"in {elapsed:.1f}s ({n_tokens / max(elapsed, 1e-9):,.0f} tokens/s)")
    return {"format_version": FORMAT_VERSION, "source": str(src.path), "seq_len": seq_len,
            "dtype": np.dtype(dtype).name, "rows": rows, "documents": docs, "doc_tokens": n_tokens,
            "shards": writer.shards, "tokenizer_digest": tokenizer_digest(tokenizer), **{f"{k}_id": v for k, v in ids.items()}}
