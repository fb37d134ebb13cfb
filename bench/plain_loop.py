"""The baseline the trainer is compared with: a plain PyTorch + transformers fine-tuning loop on a grid's data,
model and hyper-parameters, then one table of the grid's finished points and the plain runs.

    python launch/grid.py     --config bench/grids/<name>.yaml [key=value ...]   # the trainer, every point
    python bench/plain_loop.py --grid bench/grids/<name>.yaml [key=value ...] [--padding longest|max_length]

The plain loop reads the grid config (with the same key=value overrides) and builds its fine-tuning config as a
point would — `base` plus `overrides`, once per seed; `axes` are not applied (the loop has one optimizer group,
so it has no ξ) — and trains with what a transformers user writes: AutoModelForSequenceClassification,
DataLoader(shuffle) + DataCollatorWithPadding (`longest`: each batch padded to its longest member;
`max_length`: every batch padded to text.max_len), torch AdamW (biases and LayerNorm without weight decay),
transformers' schedule with the trainer's warm-up steps (ceil(warmup_ratio × steps)), clipping at
train.max_grad_norm (default 1.0), dev after every epoch (or every train.eval_every steps), the best dev weights
for the one test evaluation. Same train/dev/test examples as the trainer (trainer.text.tasks.load_task carves the
dev split); inputs are [CLS] + the first max_len − 2 word pieces + [SEP], what `tokenizer(text, truncation=True,
max_length=max_len)` gives (text.strategy head, one text field). Writes <grid output_dir>/plain-<padding>/seed-<s>/
metrics.jsonl and eval_results.json in the trainer's format; a finished run is skipped.

Speed, both sides alike, from metrics.jsonl (train.log_every=1 gives one window per step): Σ examples / Σ seconds
over the windows after the first --warmup-steps steps, leaving out the first window after each dev evaluation
(the trainer times the evaluation into it). Run both commands with the same OMP_NUM_THREADS on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_configs(grid_path: str, overrides: list[str]):
    """→ (grid config, [fine-tuning config of each seed]): base + the grid's overrides, as a grid point gets it."""
    from trainer.config import FinetuneConfig, GridConfig, load
    from trainer.grid import normalise
    grid = normalise(load(GridConfig, grid_path, overrides))
    if grid.stage != "finetune":
        sys.exit(f"error: {grid_path}: the plain loop fine-tunes (stage finetune), this grid's stage is {grid.stage}")
    base = Path(grid.base) if Path(grid.base).is_file() else REPO / grid.base
    common = [f"{k}={json.dumps(v)}" for k, v in grid.overrides.items()]
    return grid, [load(FinetuneConfig, str(base), [*common, f"seed={s}"]) for s in grid.seeds]


def train_plain(cfg, padding: str, out: Path) -> None:
    from transformers import (AutoConfig, AutoModelForSequenceClassification, DataCollatorWithPadding,
                              get_scheduler)
    from trainer.data.cache import default_cache_dir
    from trainer.metrics import classification_metrics
    from trainer.model import load_tokenizer
    from trainer.text.tasks import load_task
    if cfg.text.strategy != "head" or len(cfg.data.text_fields) != 1 or cfg.tasks:
        sys.exit("error: the plain loop runs one task, one text field, text.strategy head")
    cache = default_cache_dir()  # the trainer's: the splits it prepared are reused
    tok = load_tokenizer(cfg.model, "grammar", cache)
    splits, vocab = load_task(cfg.data, cfg.seed, tok, cache)
    width = cfg.text.max_len
    data = {name: [{"input_ids": [tok.cls_token_id, *split.pieces(j)[0][:width - 2], tok.sep_token_id],
                    "labels": int(split.labels[j])} for j in range(len(split))] for name, split in splits.items()}
    torch.manual_seed(cfg.seed)
    kw = dict(num_labels=len(vocab), attn_implementation="sdpa")
    if cfg.model.name_or_path:
        model = AutoModelForSequenceClassification.from_pretrained(cfg.model.name_or_path, **kw)
    else:  # random init from model.config (the tiny configs)
        conf = AutoConfig.for_model(**{"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, **cfg.model.config})
        conf.num_labels = len(vocab)
        model = AutoModelForSequenceClassification.from_config(conf, attn_implementation="sdpa")
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n  # noqa: E731
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in model.named_parameters() if not no_decay(n)],
          "weight_decay": cfg.optim.weight_decay},
         {"params": [p for n, p in model.named_parameters() if no_decay(n)], "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    collate = DataCollatorWithPadding(tok, padding=padding, max_length=width if padding == "max_length" else None)
    batch = cfg.train.micro_batch_size
    loader = torch.utils.data.DataLoader(data["train"], batch_size=batch, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    epochs = math.ceil(cfg.train.epochs)
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else epochs * len(loader)
    warm = cfg.optim.warmup_steps or math.ceil(cfg.optim.warmup_ratio * total)
    sched = get_scheduler(cfg.optim.scheduler, opt, num_warmup_steps=warm, num_training_steps=total)
    clip = 1.0 if cfg.train.max_grad_norm is None else cfg.train.max_grad_norm

    def evaluate(name: str, size: int = cfg.data.eval_batch_size) -> dict:
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(**collate([{"input_ids": x["input_ids"]} for x in data[name][i:i + size]])).logits
                              .argmax(-1) for i in range(0, len(data[name]), size)]).numpy()
        model.train()
        gold = np.array([x["labels"] for x in data[name]])
        return classification_metrics(pred, gold, len(vocab))

    out.mkdir(parents=True, exist_ok=True)
    lines, best, best_state, step, seen = [], -1.0, None, 0, 0
    window = {"samples": 0, "tokens": 0, "loss": 0.0, "steps": 0}
    model.train()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for b in loader:  # the step's time includes fetching and collating its batch
            loss = model(**b).loss
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            seen += len(b["labels"])
            window = {"samples": window["samples"] + len(b["labels"]), "steps": window["steps"] + 1,
                      "tokens": window["tokens"] + int(b["attention_mask"].sum()), "loss": window["loss"] + loss.item()}
            last = step == total or step % len(loader) == 0  # dev after every epoch, or every eval_every steps
            evaluate_now = bool(cfg.train.eval_every and step % cfg.train.eval_every == 0) or last
            if step % cfg.train.log_every == 0 or evaluate_now:
                dt = time.perf_counter() - t0
                lines.append({"step": step, "loss": window["loss"] / window["steps"], "lr": sched.get_last_lr()[0],
                              "samples_per_second": window["samples"] / dt, "tokens_per_second": window["tokens"] / dt,
                              "samples_seen": seen, "engine": "plain loop", "padding": padding})
                window = {"samples": 0, "tokens": 0, "loss": 0.0, "steps": 0}
            if evaluate_now:
                dev = evaluate("dev")
                lines.append({"split": "dev", "step": step, **{k: dev[k] for k in ("accuracy", "error_rate")}})
                if dev["accuracy"] > best:
                    best, best_state = dev["accuracy"], {k: v.detach().clone() for k, v in model.state_dict().items()}
            if window["steps"] == 0:
                t0 = time.perf_counter()  # evaluation and logging are outside every timed window
            if step == total:
                break
        if step == total:
            break
    model.load_state_dict(best_state)
    results = {name: evaluate(name) for name in ("dev", "test") if name in data}
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (out / "eval_results.json").write_text(json.dumps(results, indent=1))


def speed(run: Path, warmup: int) -> tuple[float, float]:
    """(examples/s, real tokens/s) of a run from its metrics.jsonl, by the rule in the module docstring."""
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [r["step"] for r in recs if r.get("split") == "dev"]
    train = [r for r in recs if "split" not in r and "samples_per_second" in r]
    samples = secs = tokens = 0.0
    prev_step, prev_seen = 0, 0
    for r in train:
        n = r["samples_seen"] - prev_seen
        after_eval = any(prev_step <= e < r["step"] for e in evals)
        if prev_step >= warmup and not after_eval:
            dt = n / r["samples_per_second"]
            samples, secs, tokens = samples + n, secs + dt, tokens + r["tokens_per_second"] * dt
        prev_step, prev_seen = r["step"], r["samples_seen"]
    return (samples / secs, tokens / secs) if secs else (float("nan"), float("nan"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", required=True, help="a grid config (stage finetune), e.g. bench/grids/trec_vs_plain.yaml")
    ap.add_argument("--padding", choices=("longest", "max_length"), default="longest")
    ap.add_argument("--warmup-steps", type=int, default=10, help="untimed first steps, both sides (default 10)")
    ap.add_argument("--report-only", action="store_true", help="train nothing; print the table")
    ap.add_argument("overrides", nargs="*", help="key=value, as given to launch/grid.py")
    args = ap.parse_args()
    grid, cfgs = run_configs(args.grid, args.overrides)
    plain = Path(grid.output_dir) / f"plain-{args.padding}"
    for cfg in cfgs:
        out = plain / f"seed-{cfg.seed}"
        if not args.report_only and not (out / "eval_results.json").is_file():
            print(f"plain loop, seed {cfg.seed} → {out}", flush=True)
            train_plain(cfg, args.padding, out)
    runs = sorted(p.parent for p in Path(grid.output_dir).glob("points/*/eval_results.json"))
    runs += sorted(p.parent for p in plain.glob("seed-*/eval_results.json"))
    rows = []
    for run in runs:
        test = json.loads((run / "eval_results.json").read_text()).get("test", {})
        error = test.get("error_rate", float("nan"))
        rows.append((run.relative_to(grid.output_dir), error, *speed(run, args.warmup_steps)))
    base = [r[2] for r in rows if str(r[0]).startswith("plain")]
    print(f"\n| run ({grid.output_dir}) | test error % | examples/s | real tokens/s | examples/s ÷ plain |\n"
          "|---|---|---|---|---|")
    for name, err, eps, tps in rows:
        ratio = f"{eps / np.median(base):.2f}" if base else "–"
        print(f"| {name} | {100 * err:.2f} | {eps:.1f} | {tps:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
