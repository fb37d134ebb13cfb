"""Tokenization into word pieces, in this process or in `num_proc` worker processes, results in input order.

The workers load the tokenizer from a copy saved in the temp dir of the cache entry being built (this preparer's
own, removed with the pool). At most num_proc + 1 batches are in flight, so memory stays flat however long the
input."""
from __future__ import annotations

import multiprocessing as mp
import shutil
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """The word pieces of each text, without [CLS]/[SEP] (the caller packs or truncates them)."""
    # split_special_tokens: a literal "[SEP]" in the text is text, not a document boundary
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, split_special_tokens=True,
                     return_token_type_ids=False, verbose=False)["input_ids"]


class TokenizePool:
    """`with TokenizePool(tokenizer, num_proc, build_dir) as pool: for item, ids in pool.map(items, texts): …`"""

    def __init__(self, tokenizer, num_proc: int, build_dir: Path):
        self.tokenizer, self.num_proc = tokenizer, num_proc
        self.tok_dir = Path(build_dir) / "_tokenizer"
        self.pool = None

    def __enter__(self) -> "TokenizePool":
        if self.num_proc > 1:
            self.tokenizer.save_pretrained(str(self.tok_dir))
            self.pool = mp.get_context("spawn").Pool(self.num_proc, initializer=_init_worker,
                                                     initargs=(str(self.tok_dir),))
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()
            shutil.rmtree(self.tok_dir, ignore_errors=True)
            self.pool = None

    def map(self, items: Iterable[T], texts: Callable[[T], list[str]] = lambda item: item
            ) -> Iterator[tuple[T, list[list[int]]]]:
        """(item, word pieces of `texts(item)`) for each item, in order."""
        if self.pool is None:
            for item in items:
                yield item, encode(self.tokenizer, texts(item))
            return
        pending: deque = deque()
        for item in items:
            pending.append((item, self.pool.apply_async(_encode_in_worker, (texts(item),))))
            if len(pending) > self.num_proc:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


_worker_tokenizer = None


def _init_worker(tokenizer_dir: str) -> None:
    global _worker_tokenizer
    from transformers import AutoTokenizer
    _worker_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)


def _encode_in_worker(texts: list[str]) -> list[list[int]]:
    return encode(_worker_tokenizer, texts)
