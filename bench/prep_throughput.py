"""Corpus preparation throughput vs. the raw fast tokenizer.

Figure: tokens/s of `trainer.corpus.prepare.prepare_corpus` (read jsonl → tokenize → pack → write shards, fresh
cache dir each run) on the first N IMDb unsup reviews, divided by tokens/s of the bare fast tokenizer
(`tokenizer(batch, add_special_tokens=False)` over the same texts, already in memory, in batches of the
same size as prepare's). Goal: ratio >= 0.8. Each side runs --repeats times (alternating); the best run counts.
Also shown: the raw tokenizer called exactly as prepare calls it (its `_encode`: ids only), a like-for-like bound.

    python bench/prep_throughput.py [--docs 10000] [--repeats 2] [--num-proc 1] [--tokenizer auto|builtin]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import _common as C

GOAL = 0.8


def raw_encode(tok, texts: list[str], batch_size: int, like_prepare: bool = False) -> tuple[int, float]:
    """like_prepare: encode with prepare's own call (trainer.corpus.prepare._encode: ids only, same flags)."""
    from trainer.corpus.prepare import _encode
    t0 = time.perf_counter()
    n = 0
    for i in range(0, len(texts), batch_size):
        if like_prepare:
            ids = _encode(tok, texts[i:i + batch_size])
        else:
            ids = tok(texts[i:i + batch_size], add_special_tokens=False)["input_ids"]
        n += sum(len(x) for x in ids)
    return n, time.perf_counter() - t0


def prepare_once(tok, jsonl: Path, seq_len: int, num_proc: int) -> tuple[int, float, dict]:
    from trainer.config import CorpusSource
    from trainer.corpus.prepare import prepare_corpus
    cache = Path(tempfile.mkdtemp(prefix="prep-bench-", dir=C.cache_dir()))
    try:
        t0 = time.perf_counter()
        corpus = prepare_corpus(CorpusSource(path=str(jsonl)), tok, seq_len, cache, num_proc, log=lambda *a: None)
        dt = time.perf_counter() - t0
        return corpus.meta["doc_tokens"], dt, corpus.meta
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=10000, help="IMDb unsup reviews to use (default 10000)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each side; the best counts (default 2)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--num-proc", type=int, default=1, help="prepare_corpus num_proc (data.num_proc; default 1)")
    ap.add_argument("--tokenizer", choices=("auto", "builtin"), default="auto",
                    help="auto: all-MiniLM-L6-v2's WordPiece if installed, else the builtin one")
    args = ap.parse_args()

    from trainer.corpus.prepare import DOCS_PER_BATCH
    spec, tok_name = C.tokenizer_spec(prefer_real=args.tokenizer == "auto")
    tok = C.load_tokenizer(spec)
    C.header("prep_throughput")
    print(f"tokenizer: {tok_name}; docs: {args.docs} IMDb unsup reviews; seq_len {args.seq_len}; "
          f"num_proc {args.num_proc}; batch {DOCS_PER_BATCH} docs")

    texts = C.imdb_texts(args.docs)
    tmp = Path(tempfile.mkdtemp(prefix="prep-bench-data-"))
    try:
        jsonl = C.write_jsonl(texts, tmp / "imdb_subset.jsonl")
        print(f"subset: {len(texts)} docs, {jsonl.stat().st_size / 1e6:.1f} MB jsonl")
        raw_best = ids_best = prep_best = 0.0
        raw_tokens = prep_tokens = None
        for r in range(args.repeats):
            n, dt = raw_encode(tok, texts, DOCS_PER_BATCH)
            raw_tokens = n
            raw_best = max(raw_best, n / dt)
            print(f"  run {r + 1}: raw tokenizer   {n:>10,} tokens in {dt:6.2f}s = {n / dt:>12,.0f} tokens/s")
            n, dt = raw_encode(tok, texts, DOCS_PER_BATCH, like_prepare=True)
            ids_best = max(ids_best, n / dt)
            print(f"  run {r + 1}: raw, as prepare {n:>10,} tokens in {dt:6.2f}s = {n / dt:>12,.0f} tokens/s "
                  f"(prepare's own _encode call: ids only, its flags)")
            n, dt, meta = prepare_once(tok, jsonl, args.seq_len, args.num_proc)
            prep_tokens = n
            prep_best = max(prep_best, n / dt)
            print(f"  run {r + 1}: prepare_corpus  {n:>10,} tokens in {dt:6.2f}s = {n / dt:>12,.0f} tokens/s "
                  f"({meta['rows']:,} rows)")
        if raw_tokens != prep_tokens:
            print(f"WARNING: token counts differ: raw {raw_tokens:,} vs prepare {prep_tokens:,}")
        ratio = prep_best / raw_best
        print(f"raw tokenizer (best): {raw_best:,.0f} tokens/s")
        print(f"prepare_corpus (best): {prep_best:,.0f} tokens/s")
        print(f"ratio: {ratio:.3f} (goal >= {GOAL})")
        print(f"raw tokenizer called as prepare calls it (best): {ids_best:,.0f} tokens/s; "
              f"prepare / that = {prep_best / ids_best:.3f}")
        print(f"SUMMARY prep_throughput: prepare {prep_best:,.0f} tok/s / raw tokenizer {raw_best:,.0f} tok/s = "
              f"{ratio:.3f} -> goal >= {GOAL} {'MET' if ratio >= GOAL else 'NOT MET'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
