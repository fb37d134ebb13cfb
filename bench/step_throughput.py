"""Trainer step throughput vs. a bare PyTorch loop on the same model and batches (1 process, CPU).

trainer: `python launch/pretrain.py --config configs/pretrain/tiny.yaml output_dir=<tmp> <model/data overrides>`
  as a subprocess (no accelerate launch), train.log_every = --warmup, train.max_steps = --warmup + --steps,
  save_every=0. tokens/s is read from metrics.jsonl: the first window (the warm-up) is dropped and the others
  are combined (Σ tokens / Σ time; each window's tokens are recomputed from the same batches).
bare: a fresh subprocess builds the same config, tokenizer, model (same init seed, trainer.model.build_model,
  the same masked-positions-only MLM loss as the stage: trainer.masked_head) and the same batches (the stage's GlobalOrder/PackedDataset/RankBatches/MLMCollator, materialised in memory
  before timing), then runs torch.optim.AdamW (fused, as the trainer) with forward / backward / step / zero_grad; the same --warmup
  steps are run untimed, then --steps steps are timed.
Both get the same OMP/MKL thread count. Runs alternate (bare, trainer, bare, trainer, ...) and the figure is
median(trainer tokens/s) / median(bare tokens/s). Goal: >= 0.97.

    python bench/step_throughput.py [--pairs 2] [--steps 80] [--warmup 20] [--micro-batch 8] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

GOAL = 0.97
CONFIG = C.REPO / "configs" / "pretrain" / "tiny.yaml"


def overrides(args) -> list[str]:
    return [f"model.config.hidden_size={args.hidden}", f"model.config.num_hidden_layers={args.layers}",
            f"model.config.num_attention_heads={args.heads}", f"model.config.intermediate_size={4 * args.hidden}",
            f"model.config.max_position_embeddings={max(args.seq_len, 128)}", f"data.seq_len={args.seq_len}",
            f"data.num_workers={args.num_workers}", f"train.micro_batch_size={args.micro_batch}",
            "train.grad_accum=1", f"train.max_steps={args.warmup + args.steps}", f"train.log_every={args.warmup}",
            "train.save_every=0", "train.keep_last=1", f"train.max_grad_norm={args.max_grad_norm}"]


def load_cfg(args, output_dir: str = "unused"):
    from trainer.config import PretrainConfig, load
    return load(PretrainConfig, str(CONFIG), [f"output_dir={output_dir}", *overrides(args)])


def make_batches(cfg, n: int):
    """The first n micro-batches of rank 0 of 1, built as trainer/stages/pretrain.py builds them."""
    tokenizer, _, _, loader = C.pretrain_batches(cfg)
    out = []
    for batch in loader:
        batch.pop("positions")
        out.append(batch)
        if len(out) == n:
            break
    return tokenizer, out


def bare_worker(args) -> None:
    """Runs in its own process; prints one JSON line."""
    import torch
    torch.set_num_threads(args.threads)
    from trainer.model import build_model, load_tokenizer
    from trainer.stages.pretrain import builtin_tokenizer_cache
    cfg = load_cfg(args)
    # same order as the stage: tokenizer, model, then batches (the allocation history alone moves CPU step
    # time by ~3-4 %: materialising the batches before building the model made the bare loop slower)
    tokenizer = load_tokenizer(cfg.model, *builtin_tokenizer_cache(cfg))
    model = build_model(cfg.model, tokenizer, head="mlm")
    from trainer.masked_head import use_masked_positions_only
    use_masked_positions_only(model)  # the stage's loss: the loop's overhead is what is measured
    model.train()
    t0 = time.perf_counter()
    _, batches = make_batches(cfg, args.warmup + args.steps)
    collate_s = time.perf_counter() - t0
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay, fused=True)  # the trainer's kernel: the ratio is
    # the trainer's overhead, not a choice of Adam kernel (bench/optimizer_step.py measures that)
    tokens = 0
    start = t_window = c_start = c_window = None
    window_tokens, windows, cpu_windows = 0, [], []  # per --warmup steps, like the trainer's log windows
    for i, batch in enumerate(batches):
        if i == args.warmup:
            start = t_window = time.perf_counter()
            c_start = c_window = time.process_time()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            n = int(batch["attention_mask"].sum())
            tokens += n
            window_tokens += n
            if (i + 1 - args.warmup) % args.warmup == 0 or i + 1 == len(batches):
                now, cnow = time.perf_counter(), time.process_time()
                windows.append(window_tokens / (now - t_window))
                cpu_windows.append(window_tokens / (cnow - c_window))
                window_tokens, t_window, c_window = 0, now, cnow
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - c_start
    # what the trainer does per step on top of this loop that costs compute: grad-norm clipping
    loss = model(**batches[-1]).loss
    loss.backward()
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    clip_s = (time.perf_counter() - t0) / reps
    print(json.dumps({"tokens": tokens, "seconds": elapsed, "tokens_per_second": tokens / elapsed,
                      "windows": windows, "cpu_seconds": cpu, "tokens_per_cpu_second": tokens / cpu,
                      "cpu_windows": cpu_windows, "threads": torch.get_num_threads(), "batch_build_s": collate_s,
                      "clip_s": clip_s, "step_s": elapsed / args.steps}), flush=True)


def run_bare(args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--bare-worker", *worker_argv(args)]
    p = subprocess.run(cmd, env=C.child_env(args.threads), capture_output=True, text=True, cwd=C.REPO)
    if p.returncode != 0:
        sys.exit(f"bare loop failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def trainer_cmd(args, out: str) -> list[str]:
    return [sys.executable, "launch/pretrain.py", "--config", str(CONFIG.relative_to(C.REPO)),
            f"output_dir={out}", *overrides(args)]


def run_trainer(args, window_tokens: list[int]) -> dict:
    """Run the trainer; besides its own tokens/s, sample its CPU time (psutil) whenever metrics.jsonl gains a
    line, so that each window's CPU-seconds are known too (poll every 20 ms: < 0.5 % error per window)."""
    import psutil
    out = tempfile.mkdtemp(prefix="step-bench-run-")
    metrics = Path(out, "metrics.jsonl")
    cpu_marks: list[float] = []
    try:
        with open(Path(out, "stdout.txt"), "w") as so, open(Path(out, "stderr.txt"), "w") as se:
            p = subprocess.Popen(trainer_cmd(args, out), env=C.child_env(args.threads), stdout=so, stderr=se,
                                 cwd=C.REPO)
            proc = psutil.Process(p.pid)
            while p.poll() is None:
                try:
                    lines = metrics.read_bytes().count(b"\n") if metrics.is_file() else 0
                    if lines > len(cpu_marks):
                        t = proc.cpu_times()
                        cpu_marks += [t.user + t.system] * (lines - len(cpu_marks))
                except (psutil.Error, OSError):
                    pass
                time.sleep(0.02)
        if p.returncode != 0:
            sys.exit(f"trainer failed (rc {p.returncode}):\n{Path(out, 'stderr.txt').read_text()[-3000:]}")
        recs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    timed = [r for r in recs if r["step"] > args.warmup]
    expected = args.steps // args.warmup + (1 if args.steps % args.warmup else 0)
    if len(timed) != expected or len(timed) != len(window_tokens):
        sys.exit(f"unexpected metrics windows: {[r['step'] for r in recs]}")
    secs = sum(tok / r["tokens_per_second"] for tok, r in zip(window_tokens, timed))
    tokens = sum(window_tokens)
    cpu_w = [b - a for a, b in zip(cpu_marks, cpu_marks[1:])]
    if len(cpu_marks) != len(recs) or min(cpu_w, default=0) <= 0:
        sys.exit(f"could not sample the trainer's CPU time per window: {cpu_marks}")
    return {"tokens": tokens, "seconds": secs, "tokens_per_second": tokens / secs,
            "tokens_per_cpu_second": tokens / sum(cpu_w), "cpu_seconds": sum(cpu_w),
            "cpu_windows": [tok / c for tok, c in zip(window_tokens, cpu_w)],
            "windows": [r["tokens_per_second"] for r in timed],
            "warmup_window": round(recs[0]["tokens_per_second"])}


def worker_argv(args) -> list[str]:
    return [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--micro-batch={args.micro_batch}",
            f"--seq-len={args.seq_len}", f"--hidden={args.hidden}", f"--layers={args.layers}",
            f"--heads={args.heads}", f"--threads={args.threads}", f"--num-workers={args.num_workers}",
            f"--max-grad-norm={args.max_grad_norm}"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2, help="(bare, trainer) run pairs, alternating (default 2)")
    ap.add_argument("--steps", type=int, default=80, help="timed steps per run (default 80)")
    ap.add_argument("--warmup", type=int, default=20,
                    help="untimed steps first; also train.log_every, so --steps should be a multiple (default 20)")
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP/MKL/torch threads for both (default 1: on the 2-vCPU benchmark VM, 2 threads make "
                         "step times erratic, 0.2 s to several s, see RESULTS.md)")
    ap.add_argument("--num-workers", type=int, default=0, help="trainer data.num_workers (tiny.yaml: 0)")
    ap.add_argument("--max-grad-norm", type=float, default=1.0,
                    help="trainer train.max_grad_norm (trainer default 1.0; the bare loop never clips)")
    ap.add_argument("--bare-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_worker:
        return bare_worker(args)

    C.header("step_throughput")
    print(f"model: BERT hidden {args.hidden}, {args.layers} layers, {args.heads} heads, ffn {4 * args.hidden}; "
          f"builtin tokenizer/corpus (tiny.yaml); seq_len {args.seq_len}, micro-batch {args.micro_batch}; "
          f"{args.warmup} warm-up + {args.steps} timed steps; threads {args.threads}; "
          f"trainer max_grad_norm {args.max_grad_norm}, num_workers {args.num_workers}")
    print("trainer command: " + " ".join(trainer_cmd(args, "<tmp>")))
    # prepare the corpus once (cache shared by all runs through BERT_RECIPE_CACHE) and get each window's tokens
    cfg = load_cfg(args)
    _, batches = make_batches(cfg, args.warmup + args.steps)
    timed = [int(b["attention_mask"].sum()) for b in batches[args.warmup:]]
    window_tokens = [sum(timed[i:i + args.warmup]) for i in range(0, len(timed), args.warmup)]
    bare, trainer, bare_w, trainer_w, clip, step = [], [], [], [], [], []
    bare_cpu, trainer_cpu = [], []
    meter = C.LoadMeter().start()
    for i in range(args.pairs):
        b = run_bare(args)
        bare.append(b["tokens_per_second"])
        bare_cpu.append(b["tokens_per_cpu_second"])
        bare_w += b["windows"]
        clip.append(b["clip_s"])
        step.append(b["step_s"])
        print(f"  pair {i + 1}: bare    {b['tokens_per_second']:>9,.0f} tokens/s ({b['tokens']:,} tokens in "
              f"{b['seconds']:.1f}s; windows {[round(w) for w in b['windows']]}; torch threads {b['threads']}; "
              f"its {args.warmup + args.steps} batches were built beforehand, untimed, in {b['batch_build_s']:.2f}s); "
              f"{b['tokens_per_cpu_second']:,.0f} tokens per CPU-s")
        t = run_trainer(args, window_tokens)
        trainer.append(t["tokens_per_second"])
        trainer_cpu.append(t["tokens_per_cpu_second"])
        trainer_w += t["windows"]
        print(f"  pair {i + 1}: trainer {t['tokens_per_second']:>9,.0f} tokens/s ({t['tokens']:,} tokens in "
              f"{t['seconds']:.1f}s; windows {[round(w) for w in t['windows']]}; dropped warm-up window "
              f"{t['warmup_window']}); {t['tokens_per_cpu_second']:,.0f} tokens per CPU-s")
    other = meter.stop()
    mb, mt = C.median(bare), C.median(trainer)
    cpu_ratio = C.median(trainer_cpu) / C.median(bare_cpu)
    ratio = mt / mb
    wratio = C.median(trainer_w) / C.median(bare_w)
    spread = (max(bare) - min(bare)) / mb
    print(f"bare median: {mb:,.0f} tokens/s (run-to-run spread {100 * spread:.1f} %); trainer median: {mt:,.0f} "
          f"tokens/s; ratio {ratio:.3f} (goal >= {GOAL})")
    print(f"per-window medians ({len(bare_w)} windows of {args.warmup} steps each side): bare "
          f"{C.median(bare_w):,.0f}, trainer {C.median(trainer_w):,.0f} tokens/s; ratio {wratio:.3f}")
    print(f"per CPU-second (robust to other load): bare {C.median(bare_cpu):,.0f}, trainer "
          f"{C.median(trainer_cpu):,.0f} tokens/CPU-s; ratio {cpu_ratio:.3f}")
    print(C.load_note(other))
    if args.max_grad_norm > 0:
        print(f"trainer-only compute per step: clip_grad_norm_ {1e3 * C.median(clip):.1f} ms of a "
              f"{1e3 * C.median(step):.0f} ms step ({100 * C.median(clip) / C.median(step):.1f} %)")
    print(f"SUMMARY step_throughput: trainer {mt:,.0f} tok/s / bare loop {mb:,.0f} tok/s = {ratio:.3f} "
          f"(medians of {args.pairs}; per CPU-s: {cpu_ratio:.3f}; other load {other:.2f} cores) -> goal >= {GOAL} "
          f"{'MET' if ratio >= GOAL else 'NOT MET'}")


if __name__ == "__main__":
    main()
