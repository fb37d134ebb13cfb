"""Fine-tuning data at scale (issue #10): preparation speed, a rank's memory, prediction speed, stage start-up.

The documents are generated: each is 3 sentences drawn (seeded) from the IMDb unsup reviews, with one of 4
labels; the first N documents of the 1 M file are the N-document set, so sizes differ only in count.

    python bench/finetune_data.py prep     [--docs 100000] [--num-proc 2]
        tokens/s of the fine-tuning data preparation (jsonl → memory-mapped store, fresh cache) ÷ tokens/s of
        the bare fast tokenizer on the same texts in memory (one process, same batch size). Goal >= 0.8.
    python bench/finetune_data.py rss      [--sizes 100000,1000000] [--steps 20] [--repo DIR]
        peak RSS of a 1-process fine-tuning run (launch/finetune.py, tiny BERT, all-MiniLM-L6-v2's tokenizer)
        on N training documents, the data prepared beforehand (unmeasured). Goal: <= +10 % from 100 k to 1 M.
    python bench/finetune_data.py predict  [--docs 100000]
        examples/s of launch/predict.py on N documents, 1 process vs 2 (accelerate launch, CPU).
    python bench/finetune_data.py start    [--docs 100000] [--repo DIR]
        time from each stage's start to its first training step in a 3-stage recipe (MFiT → FiT × 2 on two
        generated tasks): run twice on one cache, the second run's figures are "on an already-prepared cache".

`--repo DIR` runs the trainer of another checkout (e.g. `git worktree add /tmp/base <rev>`): the baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _common as C

TINY_MODEL = ["model.config.hidden_size=64", "model.config.num_hidden_layers=2", "model.config.num_attention_heads=2",
              "model.config.intermediate_size=128", "model.config.max_position_embeddings=128"]


def generate(n: int, path: Path, seed: int = 0) -> Path:
    """n documents of 3 IMDb sentences each, label = 0..3 (seeded)."""
    sentences = [s.strip() for t in C.imdb_texts(5000) for s in re.split(r"(?<=[.!?])\s+", t.replace("<br />", " "))
                 if 20 <= len(s.strip()) <= 300]
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, n, 100_000):
            k = min(100_000, n - start)
            picks = rng.integers(0, len(sentences), size=(k, 3))
            labels = rng.integers(0, 4, size=k)
            f.writelines(json.dumps({"text": " ".join(sentences[j] for j in row), "label": int(y)}) + "\n"
                         for row, y in zip(picks, labels))
    return path


def head(path: Path, n: int, out: Path) -> Path:
    with open(path) as src, open(out, "w") as dst:
        for i, line in enumerate(src):
            if i == n:
                break
            dst.write(line)
    return out


def finetune_cmd(args, train: Path, dev: Path, out: str, tok: str) -> list[str]:
    return [sys.executable, "launch/finetune.py", "--config", "configs/finetune/tiny.yaml", f"output_dir={out}",
            f"model.tokenizer={tok}", f"data.train={train}", f"data.dev={dev}", "data.test=null", *TINY_MODEL,
            f"train.max_steps={args.steps}", f"train.log_every={args.steps}", f"train.eval_every={args.steps}",
            "train.save_every=0", "text.max_len=128"]


def cmd_rss(args, tmp: Path, tok: str) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    full = generate(max(sizes), tmp / "docs.jsonl")
    dev = head(full, 1000, tmp / "dev.jsonl")
    repo = Path(args.repo).resolve() if args.repo else C.REPO
    print(f"trainer: {repo} ({C.git_state() if repo == C.REPO else 'baseline checkout'}); {args.steps} steps, "
          f"micro-batch 16, max_len 128, tiny BERT 64x2")
    peaks = {}
    for n in sizes:
        train = full if n == max(sizes) else head(full, n, tmp / f"train_{n}.jsonl")
        if args.prepare:  # unmeasured: the store is built by a first run that stops at step 1
            C.peak_rss(finetune_cmd(argparse.Namespace(steps=1), train, dev, str(tmp / "warm"), tok), cwd=repo)
            shutil.rmtree(tmp / "warm", ignore_errors=True)
        m = C.peak_rss(finetune_cmd(args, train, dev, str(tmp / f"run_{n}"), tok), cwd=repo)
        shutil.rmtree(tmp / f"run_{n}", ignore_errors=True)
        peaks[n] = m["maxrss"]
        print(f"  {n:>9,} documents: peak RSS {m['maxrss'] / 2**20:,.0f} MiB ({m['how']}); polled Σ anon "
              f"{m['poll_anon'] / 2**20:,.0f} MiB; {m['wall']:.0f} s")
    lo, hi = sizes[0], sizes[-1]
    growth = peaks[hi] / peaks[lo] - 1
    print(f"SUMMARY finetune rss: {peaks[lo] / 2**20:,.0f} MiB ({lo:,} docs) -> {peaks[hi] / 2**20:,.0f} MiB "
          f"({hi:,} docs) = {100 * growth:+.1f} % -> goal <= +10 % {'MET' if growth <= 0.10 else 'NOT MET'}")


def cmd_prep(args, tmp: Path, tok_spec: str) -> None:
    from trainer.config import ClassificationDataConfig
    from trainer.text.tasks import read_split
    data = generate(args.docs, tmp / "docs.jsonl")
    tok = C.load_tokenizer(tok_spec)
    texts = [json.loads(line)["text"] for line in open(data)]
    best_raw = 0.0
    for _ in range(2):
        t0, n = time.perf_counter(), 0
        for i in range(0, len(texts), 1000):
            n += sum(len(x) for x in tok(texts[i:i + 1000], add_special_tokens=False)["input_ids"])
        best_raw = max(best_raw, n / (time.perf_counter() - t0))
    print(f"raw fast tokenizer (texts in memory, batches of 1000, 1 process): {best_raw:,.0f} pieces/s")
    del texts
    results = {}
    for num_proc in sorted({1, args.num_proc}):
        best = 0.0
        for r in range(2):
            cache = tmp / f"cache_{num_proc}_{r}"
            t0 = time.perf_counter()
            store = read_split(str(data), ClassificationDataConfig(num_proc=num_proc), "train", tok, cache)
            best = max(best, sum(store.meta["pieces"]) / (time.perf_counter() - t0))
            shutil.rmtree(cache)
        results[num_proc] = best
        print(f"prepare (read jsonl, tokenize, write the store; num_proc {num_proc}): {best:,.0f} pieces/s = "
              f"{best / best_raw:.2f} x raw")
    top = max(results, key=results.get)
    print(f"SUMMARY finetune prep: {results[top]:,.0f} pieces/s (num_proc {top}) / raw {best_raw:,.0f} = "
          f"{results[top] / best_raw:.2f} (num_proc 1: {results[1] / best_raw:.2f}) -> goal >= 0.8 "
          f"{'MET' if results[top] / best_raw >= 0.8 else 'NOT MET'}")


def cmd_predict(args, tmp: Path, tok: str) -> None:
    docs = generate(args.docs, tmp / "docs.jsonl")
    small = head(docs, 2000, tmp / "small.jsonl")
    model = tmp / "model"
    C.peak_rss(finetune_cmd(argparse.Namespace(steps=10), small, head(small, 200, tmp / "dev.jsonl"), str(model),
                            tok))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                "launch/accelerate/cpu_ddp.yaml", "--num_processes", "2"]

    def predict(prefix, out):
        cmd = [*prefix, "launch/predict.py", "--model", str(model / "hf_model"), "--input", str(docs),
               "--output", str(tmp / out), "--overwrite", "--batch_size", "64"]
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=C.REPO, check=True, capture_output=True, env=dict(os.environ,
                       OMP_NUM_THREADS="1"))
        return time.perf_counter() - t0

    predict([sys.executable], "warm.jsonl")  # prepares the input into the cache (unmeasured)
    one = predict([sys.executable], "one.jsonl")
    two = predict(launcher, "two.jsonl")
    def rows(name):
        return [json.loads(line) for line in open(tmp / name)]
    a, b = rows("one.jsonl"), rows("two.jsonl")  # (batches differ in padding width: probabilities to ~1e-6)
    same = len(a) == len(b) and all(x["label"] == y["label"] and all(
        abs(x["probabilities"][k] - y["probabilities"][k]) < 1e-4 for k in x["probabilities"]) for x, y in zip(a, b))
    print(f"  1 process: {one:.1f} s = {args.docs / one:,.0f} examples/s")
    print(f"  2 processes: {two:.1f} s = {args.docs / two:,.0f} examples/s ({args.docs / two / 2:,.0f} per process); "
          f"outputs {'the same (labels; probabilities within 1e-4)' if same else 'DIFFER'}")
    print(f"SUMMARY finetune predict: {args.docs:,} docs (tiny BERT 64x2, max_len 128, 1 thread per process, input "
          f"prepared): 1 process {args.docs / one:,.0f} ex/s, 2 processes {args.docs / two:,.0f} ex/s = "
          f"{one / two:.2f}x")


def cmd_start(args, tmp: Path, tok: str) -> None:
    a = generate(args.docs, tmp / "a.jsonl", seed=1)
    b = generate(args.docs, tmp / "b.jsonl", seed=2)
    dev_a, dev_b = head(a, 500, tmp / "dev_a.jsonl"), head(b, 500, tmp / "dev_b.jsonl")
    repo = Path(args.repo).resolve() if args.repo else C.REPO
    tasks = (f"tasks=[{{name: a, data: {{train: {a}, dev: {dev_a}}}, text: {{strategy: head, max_len: 128}}}}, "
             f"{{name: b, data: {{train: {b}, dev: {dev_b}}}, text: {{strategy: head_tail, max_len: 128, "
             f"head_tokens: 32}}}}]")
    for run in ("first run (cache cold)", "second run (cache prepared)"):
        out = tmp / f"recipe_{run[:5]}"
        cmd = [sys.executable, "launch/recipe.py", "--config", "configs/recipe/tiny.yaml", f"output_dir={out}",
               f"model.tokenizer={tok}", tasks, *TINY_MODEL, "stages.fit_baseline=false",
               "stages.further_pretrain=false", "stages.fit_after_pretrain=false", "stages.multitask=true",
               "stages.fit_after_multitask=true", "finetune.train.max_steps=2", "finetune.train.log_every=1"]
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                             env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
        starts, firsts, tail = [], [], []
        for line in p.stdout:
            now = time.perf_counter() - t0
            tail = (tail + [line])[-30:]
            message = line.split("] ", 1)[-1].split(": ", 1)[-1]  # the job log's message (trainer/logs.py FORMAT)
            if re.match(r"\[\d+/\d+\] ", message):
                starts.append((now, message.split("→")[0].strip()))
            elif message.startswith("engine: "):
                firsts.append(now)
        if p.wait() != 0:
            sys.exit("recipe failed:\n" + "".join(tail))
        waits = [f - s for (s, _), f in zip(starts, firsts)]
        print(f"  {run}: " + " · ".join(f"{name} {w:.1f} s" for (_, name), w in zip(starts, waits)) +
              f" · total to first steps {sum(waits):.1f} s")
        shutil.rmtree(out, ignore_errors=True)
    print(f"SUMMARY finetune start: {args.docs:,} docs per task, 3 stages: {sum(waits):.1f} s of start-up on a "
          f"prepared cache ({repo.name})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("prep", "rss", "predict", "start"))
    ap.add_argument("--docs", type=int, default=100_000)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--repo", default=None, help="run the trainer of this checkout (the baseline)")
    ap.add_argument("--no-prepare", dest="prepare", action="store_false",
                    help="rss: do not prepare the data in an unmeasured first run (the baseline has no store)")
    args = ap.parse_args()
    C.header(f"finetune_data {args.mode}")
    tok, name = C.tokenizer_spec(prefer_real=True)
    print(f"tokenizer: {name}")
    tmp = Path(tempfile.mkdtemp(prefix="finetune-data-bench-"))
    try:
        {"rss": cmd_rss, "start": cmd_start, "prep": cmd_prep, "predict": cmd_predict}[args.mode](args, tmp, tok)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
