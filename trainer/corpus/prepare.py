"""Tokenize a corpus once and pack it into fixed-length BERT sequences stored as memory-mapped shards.

Layout: `[CLS] doc₁ [SEP] doc₂ [SEP] … [SEP]` — documents are packed back to back, each boundary marked by
[SEP] (RoBERTa's FULL-SENTENCES packing), so >99 % of positions are real tokens even for short documents.
A shard is a raw `(rows, seq_len)` array of uint16/uint32; `meta.json` describes the whole set.
The cache key is (sources, tokenizer content, seq_len, format version): a second run reuses the shards."""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import time
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
    return hashlib.sha1(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


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


def prepare_corpus(src: CorpusSource, tokenizer, seq_len: int, cache_dir: Optional[Path] = None,
                   num_proc: int = 1, log=print) -> PreparedCorpus:
    """Return the prepared corpus for `src`, building it if the cache does not hold it yet."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    final = cache_dir / cache_key(src, tokenizer, seq_len)
    if (final / "meta.json").is_file():
        return PreparedCorpus(final, json.loads((final / "meta.json").read_text()))
    tmp = cache_dir / f".{final.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = _build(src, tokenizer, seq_len, tmp, num_proc, log)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(final)
        except OSError:  # a concurrent preparer (another node) won: use theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PreparedCorpus(final, json.loads((final / "meta.json").read_text()))


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
