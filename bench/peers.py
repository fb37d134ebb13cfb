"""The baselines the trainer is compared with, on a grid's data, model and hyper-parameters, then one table of
the grid's finished points and the baselines' runs.

    python bench/peers.py --grid bench/grids/<name>.yaml [--peer plain|hf-trainer] [--with-grid] [key=value ...]
    python bench/peers.py --like RUN_DIR --out DIR [--peer ...] [key=value ...]

`--like`: one peer run on the resolved config of a finished trainer run (`RUN_DIR/config.yaml`, overrides
applied on top), written to --out, then both speeds and their ratio. The caller launches it; under
`accelerate launch` with a DeepSpeed config the HF side runs the JSON that config names (accelerate exports it
to every rank) — bench/gpu/run_all.sh's `ft_hf_trainer` step.

Peers (`--peer`, default plain):
  plain       what a transformers user writes by hand: AutoModelForSequenceClassification, DataLoader(shuffle) +
              DataCollatorWithPadding (`--padding longest`: each batch padded to its longest member; `max_length`:
              every batch padded to text.max_len), torch AdamW (biases and LayerNorm without weight decay),
              transformers' schedule, clipping; one process.
  hf-trainer  transformers' `Trainer` as a savvy user sets it up: length-grouped batches
              (`train_sampling_strategy="group_by_length"`), its default optimizer (fused AdamW), the same
              schedule, clipping and seed; with the grid's `launcher` (an accelerate config, e.g.
              `launcher=launch/accelerate/cpu_zero2.yaml`) it runs under `accelerate launch` with that config's
              ranks and DeepSpeed JSON (`TrainingArguments(deepspeed=…)`, gloo on CPU).
Both: the same train/dev/test examples and model inputs as the trainer (trainer.text.tasks.load_task carves the
dev split; trainer.text.truncation.Encoder applies text.strategy head, tail or head_tail to the stored word
pieces — hierarchical has no peer); the plain loop also takes multi-label and regression tasks (transformers'
`problem_type`: BCE, MSE on the raw target), selected on dev by the trainer's default metric; one optimizer group (no ξ: compare with the grid's optim.layer_decay=1.0
point); warm-up steps ceil(warmup_ratio × steps); dev after every epoch (or every train.eval_every steps), the
best dev weights for the one test evaluation. `--with-grid` first runs the grid's points (`python -m
trainer.entry.grid`), so one command measures both sides on the same machine state. Each peer writes
<grid output_dir>/<peer>[-<padding>]/seed-<s>/metrics.jsonl and eval_results.json in the trainer's format; a
finished run is skipped.

Speed, both sides alike, from metrics.jsonl (train.log_every=1 gives one window per step): Σ examples / Σ seconds
over the windows after the first --warmup-steps steps, leaving out the first window after each dev evaluation
(the trainer times the evaluation into it). Examples are global (all ranks). Run on a quiet machine with the same
OMP_NUM_THREADS for every side.
"""
from __future__ import annotations

import argparse
import json
import math
import os
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
    from trainer.grid import base_path, normalise
    grid = normalise(load(GridConfig, grid_path, overrides))
    if grid.stage != "finetune":
        sys.exit(f"error: {grid_path}: the peers fine-tune (stage finetune), this grid's stage is {grid.stage}")
    base = base_path(grid)
    common = [f"{k}={json.dumps(v)}" for k, v in grid.overrides.items()]
    return grid, [load(FinetuneConfig, str(base), [*common, f"seed={s}"]) for s in grid.seeds]


def task_inputs(cfg):
    """→ (tokenizer, label vocabulary, {split: [{input_ids, labels}]}): the trainer's examples and inputs."""
    from trainer.data.cache import default_cache_dir
    from trainer.model import load_tokenizer
    from trainer.text.tasks import load_task
    from trainer.text.truncation import Encoder
    if cfg.text.strategy == "hierarchical" or len(cfg.data.text_fields) != 1 or cfg.tasks:
        sys.exit("error: the peers run one task, one text field, text.strategy head, tail or head_tail")
    if (cfg.train.grad_accum or 1) != 1:
        sys.exit("error: the peers step once per micro-batch; set overrides.train.grad_accum=1")
    cache = default_cache_dir()  # the trainer's: the splits it prepared are reused
    tok = load_tokenizer(cfg.model, "grammar", cache)
    splits, vocab = load_task(cfg.data, cfg.seed, tok, cache)
    encoder = Encoder(tok, cfg.text)
    def target(y):  # a class id, a multi-hot row, a number (trainer/problems.py)
        return y.tolist() if isinstance(y, np.ndarray) else int(y) if np.issubdtype(type(y), np.integer) else float(y)
    data = {name: [{"input_ids": encoder.encode_pieces(split.pieces(j))[0][0], "labels": target(split.labels[j])}
                   for j in range(len(split))] for name, split in splits.items()}
    return tok, vocab, data


def new_model(cfg, tok, num_labels: int):
    """transformers' own head for the task's kind: `problem_type` picks its loss (cross-entropy, BCE, MSE)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from trainer.problems import HF_PROBLEM_TYPE
    torch.manual_seed(cfg.seed)
    kw = dict(num_labels=num_labels, attn_implementation="sdpa", problem_type=HF_PROBLEM_TYPE[cfg.data.problem_type])
    if cfg.model.name_or_path:
        return AutoModelForSequenceClassification.from_pretrained(cfg.model.name_or_path, **kw)
    conf = AutoConfig.for_model(**{"vocab_size": len(tok), "pad_token_id": tok.pad_token_id, **cfg.model.config})
    conf.num_labels, conf.problem_type = num_labels, kw["problem_type"]  # random init from model.config
    return AutoModelForSequenceClassification.from_config(conf, attn_implementation="sdpa")


def total_and_warmup_steps(cfg, batches_per_epoch: int) -> tuple[int, int]:
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(cfg.train.epochs) * batches_per_epoch
    return total, cfg.optim.warmup_steps or math.ceil(cfg.optim.warmup_ratio * total)


class Windows:
    """Timing windows in the trainer's metrics.jsonl format: `step(...)` after each optimizer step, `mark()` after
    anything that is not training (evaluation, logging) so that it stays outside every window."""

    def __init__(self, cfg, engine: str, **fields):
        self.every, self.fields, self.lines, self.seen = cfg.train.log_every, {"engine": engine, **fields}, [], 0
        self.window = {"samples": 0, "tokens": 0, "loss": 0.0, "steps": 0}
        self.t0 = time.perf_counter()

    def step(self, step: int, samples: int, tokens: int, loss: float, lr: float, close: bool) -> None:
        w = self.window
        self.seen += samples
        w.update(samples=w["samples"] + samples, tokens=w["tokens"] + tokens, loss=w["loss"] + loss,
                 steps=w["steps"] + 1)
        if step % self.every == 0 or close:
            dt = time.perf_counter() - self.t0
            self.lines.append({"step": step, "loss": w["loss"] / w["steps"], "lr": lr,
                               "samples_per_second": w["samples"] / dt, "tokens_per_second": w["tokens"] / dt,
                               "samples_seen": self.seen, **self.fields})
            self.window = {"samples": 0, "tokens": 0, "loss": 0.0, "steps": 0}
            self.t0 = time.perf_counter()

    def mark(self) -> None:
        if self.window["steps"] == 0:
            self.t0 = time.perf_counter()


def write_run(out: Path, lines: list, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (out / "eval_results.json").write_text(json.dumps(results, indent=1))


def train_plain(cfg, padding: str, out: Path) -> None:
    from transformers import DataCollatorWithPadding, get_scheduler
    from trainer import problems
    tok, vocab, data = task_inputs(cfg)
    kind = cfg.data.problem_type
    model = new_model(cfg, tok, problems.num_outputs(kind, vocab))
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n or "layer_norm" in n  # noqa: E731
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in model.named_parameters() if not no_decay(n)],
          "weight_decay": cfg.optim.weight_decay},
         {"params": [p for n, p in model.named_parameters() if no_decay(n)], "weight_decay": 0.0}],
        lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    width = cfg.text.max_len
    collate = DataCollatorWithPadding(tok, padding=padding, max_length=width if padding == "max_length" else None)
    loader = torch.utils.data.DataLoader(data["train"], batch_size=cfg.train.micro_batch_size, shuffle=True,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(cfg.seed))
    total, warm = total_and_warmup_steps(cfg, len(loader))
    sched = get_scheduler(cfg.optim.scheduler, opt, num_warmup_steps=warm, num_training_steps=total)
    clip = 1.0 if cfg.train.max_grad_norm is None else cfg.train.max_grad_norm

    def evaluate(name: str, size: int = cfg.data.eval_batch_size) -> dict:
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(**collate([{"input_ids": x["input_ids"]} for x in data[name][i:i + size]]))
                                .logits.float() for i in range(0, len(data[name]), size)]).numpy()
        model.train()
        gold = np.array([x["labels"] for x in data[name]])
        return problems.metrics(kind, logits, gold, vocab)

    metric = problems.DEFAULT_METRIC[kind]  # the trainer's eval.select_metric=auto
    windows = Windows(cfg, "plain loop", padding=padding)
    best, best_state, step = float("inf"), None, 0
    model.train()
    while step < total:
        for b in loader:  # the step's time includes fetching and collating its batch
            loss = model(**b).loss
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            last = step == total or step % len(loader) == 0  # dev after every epoch, or every eval_every steps
            evaluate_now = bool(cfg.train.eval_every and step % cfg.train.eval_every == 0) or last
            windows.step(step, len(b["labels"]), int(b["attention_mask"].sum()), loss.item(),
                         sched.get_last_lr()[0], close=evaluate_now)
            if evaluate_now:
                dev = evaluate("dev")
                windows.lines.append({"split": "dev", "step": step, metric: dev[metric]})
                if problems.shortfall(metric, dev[metric]) < best:
                    best = problems.shortfall(metric, dev[metric])
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            windows.mark()
            if step == total:
                break
    model.load_state_dict(best_state)
    write_run(out, windows.lines, {name: evaluate(name) for name in ("dev", "test") if name in data})


def train_hf_trainer(cfg, out: Path, deepspeed: str | None) -> None:
    """transformers' Trainer on the task; under `accelerate launch` every rank runs this (rank 0 writes)."""
    from transformers import (DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments)
    from trainer.loop import basic_optimizer
    from trainer.problems import single_label_metrics
    from trainer.optim.param_groups import implementation
    if deepspeed:  # DeepSpeed finds no process group on CPU unless gloo is set up first (accelerate's own trap)
        from accelerate import PartialState
        PartialState(backend="gloo")
    if cfg.data.problem_type != "single_label":
        sys.exit("error: the hf-trainer peer compares single-label tasks; use --peer plain for the other kinds")
    tok, vocab, data = task_inputs(cfg)
    model = new_model(cfg, tok, len(vocab))
    collate = DataCollatorWithPadding(tok)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = cfg.train.micro_batch_size
    total, warm = total_and_warmup_steps(cfg, math.ceil(len(data["train"]) / (batch * world)))
    args = TrainingArguments(
        output_dir=str(out / "hf-trainer-output"), per_device_train_batch_size=batch,
        per_device_eval_batch_size=cfg.data.eval_batch_size, gradient_accumulation_steps=1,
        max_steps=total, learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0], adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps,
        lr_scheduler_type=cfg.optim.scheduler, warmup_steps=warm,
        max_grad_norm=1.0 if cfg.train.max_grad_norm is None else cfg.train.max_grad_norm,
        train_sampling_strategy="group_by_length", seed=cfg.seed, data_seed=cfg.seed,
        eval_strategy="steps", eval_steps=cfg.train.eval_every or math.ceil(len(data["train"]) / (batch * world)),
        save_strategy="no", logging_steps=50, report_to="none", disable_tqdm=True,
        bf16=cfg.model.precision == "bf16", fp16=cfg.model.precision == "fp16",  # the trainer's autocast
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if world > 1 and not torch.cuda.is_available() else None,
        deepspeed=deepspeed)
    windows = Windows(cfg, "hf trainer")
    best = {"accuracy": -1.0, "state": None}

    class Count(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            self._count = (len(inputs["labels"]) * world, int(inputs["attention_mask"].sum()) * world)
            loss = super().training_step(model, inputs, num_items_in_batch)
            # with average_tokens_across_devices the returned loss is scaled by the world size for the backward
            self._loss = float(loss) / (world if self.args.average_tokens_across_devices else 1)
            return loss

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            engine = trainer.model_wrapped  # what really runs: the DeepSpeed engine, DDP or the bare model
            ds = hasattr(engine, "zero_optimization_stage")
            stage = engine.zero_optimization_stage() if ds else 0
            # the precision and offload that run (DeepSpeed's own, else the arguments'), as the trainer records them
            bf16, fp16 = (engine.bfloat16_enabled(), engine.fp16_enabled()) if ds else (args.bf16, args.fp16)
            precision = "bf16" if bf16 else "fp16" if fp16 else "fp32"
            offload = "optimizer" if ds and engine.zero_cpu_offload() else "none"
            windows.fields.update(engine=f"hf trainer ({type(engine).__name__})", world_size=args.world_size,
                                  zero_stage=stage, offload=offload, precision=precision,
                                  optimizer=implementation(basic_optimizer(trainer.optimizer)))
            windows.mark()

        def on_step_end(self, args, state, control, **kw):
            lr = trainer.lr_scheduler.get_last_lr()[0]
            close = state.global_step % args.eval_steps == 0 or state.global_step == total
            windows.step(state.global_step, *trainer._count, trainer._loss, lr, close)

        def on_evaluate(self, args, state, control, metrics=None, **kw):
            windows.lines.append({"split": "dev", "step": state.global_step,
                                  "accuracy": metrics["eval_accuracy"], "error_rate": metrics["eval_error_rate"]})
            if metrics["eval_accuracy"] > best["accuracy"]:  # ZeRO-2 keeps the whole model on every rank
                best.update(accuracy=metrics["eval_accuracy"],
                            state={k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
            windows.mark()

        def on_log(self, args, state, control, **kw):
            windows.mark()

    def metrics(p):
        return single_label_metrics(p.predictions.argmax(-1), p.label_ids, vocab)

    trainer = Count(model=model, args=args, train_dataset=data["train"], eval_dataset=data["dev"],
                    data_collator=collate, compute_metrics=metrics, callbacks=[Timing()])
    trainer.train()
    trainer.model.load_state_dict(best["state"])
    predicted = {name: trainer.predict(data[name]) for name in ("dev", "test") if name in data}
    results = {name: metrics(p) for name, p in predicted.items()}  # p.label_ids: the eval loader's order
    if trainer.is_world_process_zero():
        write_run(out, windows.lines, results)


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


def launched_deepspeed_json() -> str | None:
    """Under `accelerate launch` with a DeepSpeed config: the JSON it names (accelerate exports it to every rank as
    ACCELERATE_DEEPSPEED_CONFIG_FILE); None for DDP, one process, or a DeepSpeed config without a JSON file."""
    ds = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED") != "true" or not ds:
        return None
    return str(REPO / ds) if not Path(ds).is_absolute() else ds


def run_peer(args, grid, cfg, out: Path) -> None:
    if args.peer == "plain":
        if grid.launcher:
            sys.exit(f"error: the plain loop runs one process; drop launcher={grid.launcher} or use --peer hf-trainer")
        return train_plain(cfg, args.padding, out)
    if not grid.launcher:
        return train_hf_trainer(cfg, out, None)
    import subprocess
    from trainer.grid import launcher_path
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launcher_path(grid)), __file__,
           "--grid", args.grid, "--peer", "hf-trainer", "--rank-of", str(out), "--seed", str(cfg.seed),
           *args.overrides]
    subprocess.run(cmd, check=True, cwd=REPO)


def run_like(args) -> None:
    """One peer run on a trainer run's resolved config; prints both speeds (rank 0)."""
    from trainer.config import FinetuneConfig, load
    like = Path(args.like)
    if not (like / "config.yaml").is_file() or not (like / "metrics.jsonl").is_file():
        sys.exit(f"error: --like {like}: not a finished trainer run (no config.yaml / metrics.jsonl)")
    if not args.out:
        sys.exit("error: --like needs --out DIR (the peer's output dir)")
    cfg = load(FinetuneConfig, str(like / "config.yaml"), args.overrides)
    out = Path(args.out)
    if args.peer == "plain":
        train_plain(cfg, args.padding, out)
    else:
        train_hf_trainer(cfg, out, launched_deepspeed_json())
    if (out / "metrics.jsonl").is_file():  # rank 0 wrote it
        (a, _), (b, _) = speed(like, args.warmup_steps), speed(out, args.warmup_steps)
        print(f"examples/s: trainer {a:.1f} ({like}) · {args.peer} {b:.1f} ({out}) · ratio {a / b:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--grid", help="a grid config (stage finetune), e.g. bench/grids/trec_vs_peers.yaml")
    which.add_argument("--like", help="a finished trainer run dir: one peer run on its config.yaml (needs --out)")
    ap.add_argument("--out", help="--like: the peer's output dir")
    ap.add_argument("--peer", choices=("plain", "hf-trainer"), default="plain")
    ap.add_argument("--padding", choices=("longest", "max_length"), default="longest", help="the plain loop's")
    ap.add_argument("--with-grid", action="store_true", help="run the grid's points first (launch/grid.py)")
    ap.add_argument("--warmup-steps", type=int, default=10, help="untimed first steps, every side (default 10)")
    ap.add_argument("--report-only", action="store_true", help="train nothing; print the table")
    ap.add_argument("--rank-of", help=argparse.SUPPRESS)  # one rank of a launched hf-trainer run: its output dir
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="key=value, as given to launch/grid.py")
    args = ap.parse_args()
    if args.like:
        return run_like(args)
    grid, cfgs = run_configs(args.grid, args.overrides)
    if args.rank_of:
        cfg = next(c for c in cfgs if c.seed == args.seed)
        return train_hf_trainer(cfg, Path(args.rank_of), launched_deepspeed_json())
    if args.with_grid and not args.report_only:
        import subprocess
        subprocess.run([sys.executable, "-m", "trainer.entry.grid", "--config", args.grid, *args.overrides],
                       check=True, cwd=REPO)
    name = "plain-" + args.padding if args.peer == "plain" else args.peer
    peer = Path(grid.output_dir) / name
    for cfg in cfgs:
        out = peer / f"seed-{cfg.seed}"
        if not args.report_only and not (out / "eval_results.json").is_file():
            print(f"{args.peer}, seed {cfg.seed} → {out}", flush=True)
            run_peer(args, grid, cfg, out)
    runs = sorted(p.parent for p in Path(grid.output_dir).glob("points/*/eval_results.json"))
    runs += sorted(p.parent for p in Path(grid.output_dir).glob("*/seed-*/eval_results.json"))
    from trainer.problems import DEFAULT_METRIC
    metric = DEFAULT_METRIC[cfgs[0].data.problem_type]  # error_rate, micro_f1, pearson
    what = {"error_rate": "test error %", "micro_f1": "test micro-F1 %", "pearson": "test Pearson × 100"}[metric]
    rows = []
    for run in runs:
        test = json.loads((run / "eval_results.json").read_text()).get("test", {})
        rows.append((run.relative_to(grid.output_dir), test.get(metric, float("nan")), *speed(run, args.warmup_steps)))
    base = [r[2] for r in rows if str(r[0]).startswith(name + "/")]
    print(f"\n| run ({grid.output_dir}) | {what} | examples/s | real tokens/s | examples/s ÷ {name} |\n"
          "|---|---|---|---|---|")
    for run, value, eps, tps in rows:
        ratio = f"{eps / np.median(base):.2f}" if base else "–"
        print(f"| {run} | {100 * value:.2f} | {eps:.1f} | {tps:,.0f} | {ratio} |")


if __name__ == "__main__":
    main()
