"""Corpus preparation throughput vs. the raw fast tokenizer.

Figure: tokens/s of `trainer.corpus.prepare.prepare_corpus` (read jsonl → tokenize → pack → write shards, fresh
cache dir each run) on the first N IMDb unsup reviews, divided by tokens/s of the bare fast tokenizer
(`tokenizer(batch, add_special_tokens=False)` over the same texts, already in memory, in batches of the
same size as prepare's). Goal: ratio >= 0.8. Each side runs --repeats times (alternating); the best run counts.
Also shown: the raw tokenizer called exactly as prepare calls it (ids only, its flags), a like-for-like bound.

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


def raw_encode(tok, texts: list[str], batch_size: int, like_prepare: bool = False) -> tuple[int, float, float]:
    """like_prepare: the call trainer/data/tokenize_pool.py makes (ids only, the same flags)."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for i in range(0, len(texts), batch_size):
        if like_prepare:
            ids = tok(texts[i:i + batch_size], add_special_tokens=False, return_attention_mask=False,
                      split_special_tokens=True, return_token_type_ids=False, verbose=False)["input_ids"]
        else:
            ids = tok(texts[i:i + batch_size], add_special_tokens=False)["input_ids"]
        n += sum(len(x) for x in ids)
    return n, time.perf_counter() - t0, time.process_time() - c0


def prepare_once(tok, jsonl: Path, seq_len: int, num_proc: int) -> tuple[int, float, float, dict]:
    from trainer.config import CorpusSource
    from trainer.corpus.prepare import prepare_corpus
    cache = Path(tempfile.mkdtemp(prefix="prep-bench-", dir=C.cache_dir()))
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        corpus = prepare_corpus(CorpusSource(path=str(jsonl)), tok, seq_len, cache, num_proc)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        return corpus.meta["doc_tokens"], dt, cpu, corpus.meta
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
        best = {"raw": 0.0, "like": 0.0, "prep": 0.0}
        cpu_best = {"raw": 0.0, "like": 0.0, "prep": 0.0}
        tokens = {}
        labels = {"raw": "raw tokenizer  ", "like": "raw, as prepare", "prep": "prepare_corpus "}
        meter = C.LoadMeter().start()
        for r in range(args.repeats):
            for key in ("raw", "like", "prep"):
                if key == "prep":
                    n, dt, cpu, meta = prepare_once(tok, jsonl, args.seq_len, args.num_proc)
                    note = f"({meta['rows']:,} rows)"
                else:
                    n, dt, cpu = raw_encode(tok, texts, DOCS_PER_BATCH, like_prepare=key == "like")
                    note = "(prepare's call: ids only, its flags)" if key == "like" else ""
                tokens[key] = n
                best[key] = max(best[key], n / dt)
                cpu_best[key] = max(cpu_best[key], n / cpu)
                print(f"  run {r + 1}: {labels[key]} {n:>10,} tokens in {dt:6.2f}s = {n / dt:>10,.0f} tokens/s; "
                      f"{n / cpu:>10,.0f} tokens per CPU-s {note}")
        other = meter.stop()
        if len(set(tokens.values())) != 1:
            print(f"WARNING: token counts differ: {tokens}")
        ratio = best["prep"] / best["raw"]
        cpu_ratio = cpu_best["prep"] / cpu_best["raw"]
        print(f"raw tokenizer (best): {best['raw']:,.0f} tokens/s")
        print(f"prepare_corpus (best): {best['prep']:,.0f} tokens/s")
        print(f"ratio: {ratio:.3f} (goal >= {GOAL})")
        print(f"raw tokenizer called as prepare calls it (best): {best['like']:,.0f} tokens/s; "
              f"prepare / that = {best['prep'] / best['like']:.3f}")
        cpu_note = "" if args.num_proc == 1 else " (num_proc > 1: the workers' CPU is not counted, ignore)"
        print(f"per CPU-second (robust to other load): prepare {cpu_best['prep']:,.0f} / raw {cpu_best['raw']:,.0f} "
              f"= {cpu_ratio:.3f}; prepare / raw-as-prepare = {cpu_best['prep'] / cpu_best['like']:.3f}{cpu_note}")
        print(C.load_note(other))
        print(f"SUMMARY prep_throughput: prepare {best['prep']:,.0f} tok/s / raw tokenizer {best['raw']:,.0f} tok/s = "
              f"{ratio:.3f} (per CPU-s: {cpu_ratio:.3f}; other load {other:.2f} cores) -> goal >= {GOAL} "
              f"{'MET' if ratio >= GOAL else 'NOT MET'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
