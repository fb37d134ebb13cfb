"""Cost of computing the MLM head on every position vs. on the masked positions only — the evidence behind
trainer/masked_head.py (not one of the four goal benchmarks).

HF's BertForMaskedLM projects all B×S positions onto the vocabulary, although only ~15 % carry a label. This
script trains the same model (trainer.model.build_model, same init) on the same batches (the stage's pipeline,
IMDb subset, real 30522-token vocabulary) two ways, each in a fresh process: `full` (HF's loss) and `gathered`
(encoder → select positions with labels != -100 → model.cls → cross-entropy, what the pre-training stage now
does), and reports the first-step loss (must match), median step time and peak RSS.

    python bench/mlm_head_gather.py [--steps 10] [--micro-batch 16] [--hidden 128] [--layers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C


def make_cfg(args, corpus: str, tok_spec: str):
    from trainer.config import PretrainConfig, build
    return build(PretrainConfig, {
        "model": {"tokenizer": tok_spec, "config": {
            "model_type": "bert", "hidden_size": args.hidden, "num_hidden_layers": args.layers,
            "num_attention_heads": max(1, args.hidden // 64), "intermediate_size": 4 * args.hidden,
            "max_position_embeddings": max(128, args.seq_len)}},
        "data": {"corpora": [{"path": corpus}], "seq_len": args.seq_len, "num_workers": 0},
        "train": {"micro_batch_size": args.micro_batch}})


def worker(args) -> None:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(args.threads)
    from step_throughput import make_batches
    from trainer.model import build_model, load_tokenizer
    cfg = make_cfg(args, args.corpus, args.tok_spec)
    tokenizer = load_tokenizer(cfg.model, None, C.cache_dir())
    model = build_model(cfg.model, tokenizer, head="mlm")
    model.train()
    _, batches = make_batches(cfg, args.warmup + args.steps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def loss_fn(batch):
        if args.variant == "full":
            return model(**batch).loss
        h = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        sel = batch["labels"] != -100
        return F.cross_entropy(model.cls(h[sel]).float(), batch["labels"][sel])

    times, cpus, first = [], [], None
    for i, batch in enumerate(batches):
        torch.manual_seed(i)  # same dropout in both variants
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loss_fn(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if first is None:
            first = float(loss.detach())
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    print(json.dumps({"first_loss": first, "step_s": C.median(times), "cpu_s": C.median(cpus),
                      "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", choices=("full", "gathered"), help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--tok-spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        return worker(args)

    C.header("mlm_head_gather")
    tok_spec, tok_name = C.tokenizer_spec()
    print(f"tokenizer: {tok_name}; BERT hidden {args.hidden}, {args.layers} layers; micro-batch {args.micro_batch} "
          f"x seq_len {args.seq_len}; {args.warmup} warm-up + {args.steps} timed steps; threads {args.threads}")
    tmp = Path(tempfile.mkdtemp(prefix="mlm-head-bench-"))
    try:
        corpus = str(C.write_jsonl(C.imdb_texts(args.docs), tmp / "imdb_subset.jsonl"))
        from step_throughput import make_batches
        make_batches(make_cfg(args, corpus, tok_spec), 1)  # prepare once, outside the measured processes
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        res = {}
        for variant in ("full", "gathered"):
            cmd = [sys.executable, str(Path(__file__).resolve()), f"--variant={variant}", f"--corpus={corpus}",
                   f"--tok-spec={tok_spec}", f"--steps={args.steps}", f"--warmup={args.warmup}",
                   f"--micro-batch={args.micro_batch}", f"--seq-len={args.seq_len}", f"--hidden={args.hidden}",
                   f"--layers={args.layers}", f"--threads={args.threads}"]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=C.REPO)
            if p.returncode != 0:
                sys.exit(f"{variant} failed:\n{p.stderr[-3000:]}")
            res[variant] = r = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"  {variant:8s}: first-step loss {r['first_loss']:.5f}, median step {1e3 * r['step_s']:,.0f} ms ({1e3 * r['cpu_s']:,.0f} CPU-ms), "
                  f"peak RSS {r['maxrss'] / 2**20:,.0f} MiB")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    f, g = res["full"], res["gathered"]
    print(f"SUMMARY mlm_head_gather: masked-positions-only head: step {f['step_s'] / g['step_s']:.2f}x faster "
          f"({f['cpu_s'] / g['cpu_s']:.2f}x in CPU time), "
          f"peak RSS {f['maxrss'] / 2**20:,.0f} -> {g['maxrss'] / 2**20:,.0f} MiB, first-step loss "
          f"{'equal' if abs(f['first_loss'] - g['first_loss']) < 1e-4 else 'DIFFERS'}")


if __name__ == "__main__":
    main()
