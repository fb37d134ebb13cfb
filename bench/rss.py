"""A training rank's peak RSS with a 10 MB and a 100 MB corpus (goal: <= 10 % growth).

For each size a jsonl corpus of IMDb unsup reviews (repeated in order until the text reaches the size) is
written to a temp dir and prepared first, untimed and unmeasured, into the run's cache (BERT_RECIPE_CACHE);
then `python launch/pretrain.py --config configs/pretrain/tiny.yaml ...` (1 process, no accelerate launch)
trains a fixed number of steps on it. Peak RSS of the training process:
  * ru_maxrss of the child: `/usr/bin/time -v` ("Maximum resident set size") when present, otherwise
    resource.getrusage(RUSAGE_CHILDREN) in a fresh wrapper process — the headline figure;
  * psutil polling (every 50 ms) of the process and its children (DataLoader workers), summed: peak RSS and
    peak anonymous RSS (rss - shared), which tells heap growth from mapped-file pages (the memory-mapped
    shards count in RSS once touched).

    python bench/rss.py [--sizes 10,100] [--steps 25] [--num-workers 0] [--repeats 1]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common as C

GOAL = 0.10
CONFIG = C.REPO / "configs" / "pretrain" / "tiny.yaml"

def trainer_cmd(args, corpus: Path, out: str, tok_spec: str) -> list[str]:
    return [sys.executable, "launch/pretrain.py", "--config", str(CONFIG.relative_to(C.REPO)), f"output_dir={out}",
            f"model.tokenizer={tok_spec}", f"data.corpora=[{{path: {corpus}}}]", f"data.seq_len={args.seq_len}",
            f"data.num_workers={args.num_workers}", f"model.config.hidden_size={args.hidden}",
            f"model.config.num_hidden_layers={args.layers}", f"model.config.num_attention_heads={args.heads}",
            f"model.config.intermediate_size={4 * args.hidden}",
            f"model.config.max_position_embeddings={max(128, args.seq_len)}",
            f"train.micro_batch_size={args.micro_batch}", f"train.max_steps={args.steps}",
            f"train.log_every={args.steps}", "train.save_every=0", "train.keep_last=1"]


def measure(args, corpus: Path, tok_spec: str) -> dict:
    out = tempfile.mkdtemp(prefix="rss-bench-run-")
    try:
        m = C.peak_rss([*trainer_cmd(args, corpus, out, tok_spec)], threads=args.threads, gnu_time=not args.no_gnu_time)
        if "prepared " in m["output"]:
            print("  WARNING: the trainer prepared the corpus itself (cache miss); the peak includes preparation")
        metrics = Path(out, "metrics.jsonl")
        m["logged"] = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return m


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100", help="corpus sizes in MB of text, comma-separated (default 10,100)")
    ap.add_argument("--steps", type=int, default=25, help="training steps per run (default 25)")
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--num-workers", type=int, default=0, help="trainer data.num_workers (tiny.yaml: 0)")
    ap.add_argument("--threads", type=int, default=1, help="OMP/MKL threads of the trainer (default 1)")
    ap.add_argument("--prep-num-proc", type=int, default=2, help="num_proc of the (unmeasured) preparation")
    ap.add_argument("--repeats", type=int, default=1, help="runs per size, alternating; the max peak counts")
    ap.add_argument("--tokenizer", choices=("auto", "builtin"), default="auto",
                    help="auto: all-MiniLM-L6-v2's WordPiece if installed, else the builtin one")
    ap.add_argument("--no-gnu-time", action="store_true", help="use the getrusage wrapper even if /usr/bin/time exists")
    args = ap.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]

    from trainer.config import CorpusSource
    from trainer.corpus.prepare import prepare_corpus
    C.header("rss")
    tok_spec, tok_name = C.tokenizer_spec(prefer_real=args.tokenizer == "auto")
    tok = C.load_tokenizer(tok_spec)
    print(f"tokenizer: {tok_name}; model BERT hidden {args.hidden}, {args.layers} layers; seq_len {args.seq_len}, "
          f"micro-batch {args.micro_batch}, {args.steps} steps, num_workers {args.num_workers}, threads {args.threads}")
    tmp = Path(tempfile.mkdtemp(prefix="rss-bench-data-"))
    try:
        corpora = {}
        for mb in sizes:
            path = tmp / f"imdb_{mb:g}MB.jsonl"
            docs, nbytes = C.write_jsonl_of_size(int(mb * 1e6), path)
            t0 = time.perf_counter()
            pc = prepare_corpus(CorpusSource(path=str(path)), tok, args.seq_len, C.cache_dir(), args.prep_num_proc)
            shard_bytes = sum(p.stat().st_size for p, _ in pc.shards())
            print(f"corpus {mb:g} MB: {docs:,} docs, {nbytes / 1e6:.1f} MB text, {pc.meta['doc_tokens']:,} tokens -> "
                  f"{pc.rows:,} rows, {shard_bytes / 1e6:.1f} MB of shards (prepared in "
                  f"{time.perf_counter() - t0:.0f}s, not measured)")
            corpora[mb] = path
        print("trainer command: " + " ".join(trainer_cmd(args, Path("<corpus.jsonl>"), "<tmp>", tok_spec)))
        results = {mb: [] for mb in sizes}
        for r in range(args.repeats):
            for mb in sizes:
                m = measure(args, corpora[mb], tok_spec)
                results[mb].append(m)
                print(f"  {mb:g} MB corpus, run {r + 1}: peak RSS {m['maxrss'] / 2**20:,.1f} MiB ({m['how']}); "
                      f"polled: Σ RSS {m['poll_rss'] / 2**20:,.1f} MiB, Σ anon {m['poll_anon'] / 2**20:,.1f} MiB over "
                      f"{m['procs']} process(es); {m['wall']:.0f}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peak = {mb: max(m["maxrss"] for m in results[mb]) for mb in sizes}
    anon = {mb: max(m["poll_anon"] for m in results[mb]) for mb in sizes}
    lo, hi = sizes[0], sizes[-1]
    growth = peak[hi] / peak[lo] - 1
    anon_growth = anon[hi] / anon[lo] - 1 if anon[lo] else float("nan")
    print(f"peak RSS: {lo:g} MB corpus {peak[lo] / 2**20:,.1f} MiB, {hi:g} MB corpus {peak[hi] / 2**20:,.1f} MiB, "
          f"growth {100 * growth:+.1f} % (anonymous memory only: {100 * anon_growth:+.1f} %)")
    print(f"SUMMARY rss: peak RSS {peak[lo] / 2**20:,.0f} MiB ({lo:g} MB corpus) -> {peak[hi] / 2**20:,.0f} MiB "
          f"({hi:g} MB corpus) = {100 * growth:+.1f} % -> goal <= {100 * GOAL:.0f} % "
          f"{'MET' if growth <= GOAL else 'NOT MET'}")


if __name__ == "__main__":
    main()
