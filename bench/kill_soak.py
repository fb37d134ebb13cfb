"""Soak test of exact resume: kill -9 a 2-rank pre-training run N times (default 20) at seeded random points —
after a random step, or while a checkpoint is being written — resuming with --resume after each kill, then
compare the final weights, per-step losses and lrs with an uninterrupted run of the same config.

    python bench/kill_soak.py [--kills 20] [--setup cpu_zero3] [--steps 100] [--save-every 3] [--seed 1]

Pass: max |w_killed - w_ref| <= 1e-6, the same losses (rel 1e-6) and lrs at every step, every step logged once.
The kill machinery is tests/killing.py (the CI test tests/test_sigkill.py runs 3 kills)."""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common as C  # noqa: F401  (private cache, repo on sys.path)

sys.path.insert(0, str(C.REPO / "tests"))
from killing import kill_at  # noqa: E402
from launching import accelerate_cmd, env, run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--setup", default="cpu_zero3", help="launch/accelerate/<setup>.yaml (cpu_zero2, cpu_zero3, "
                                                          "cpu_ddp)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--save-every", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()

    from safetensors.torch import load_file
    work = Path(tempfile.mkdtemp(prefix="kill-soak-"))
    cache = work / "cache"
    common = [f"train.max_steps={args.steps}", "train.log_every=1", f"train.save_every={args.save_every}",
              "train.keep_last=2"]
    ref, out = work / "ref", work / "killed"
    t0 = time.time()
    print(f"machine: {C.machine()}\ncode: {C.git_state()}\nsetup {args.setup}, {args.steps} steps, checkpoint "
          f"every {args.save_every}, {args.kills} kills, seed {args.seed}", flush=True)
    run(args.setup, ref, *common, cache=cache, timeout=1800)
    rng = random.Random(args.seed)
    trials = []
    while len(trials) < args.kills:
        kind = rng.choice(["step", "save"])
        last = max([t["logged"] for t in trials], default=0)
        if last + 1 >= args.steps:
            print(f"  no steps left for kill #{len(trials) + 1}; raise --steps")
            break
        step = rng.randint(last + 1, min(last + 5, args.steps - 1))  # past what the previous run logged
        cmd = accelerate_cmd(args.setup, "pretrain.py", "configs/pretrain/tiny.yaml", out, *common,
                             flags=["--resume"] if trials else [])
        trial = kill_at(cmd, env(cache), C.REPO, out, kind, step, timeout=900)
        if trial["finished"]:
            print(f"  the run finished before kill #{len(trials) + 1}; more steps are needed for {args.kills} kills")
            break
        trials.append(trial)
        print(f"  kill #{len(trials):2d}: {kind:4s} >= {step:3d} -> killed with {trial['logged']} steps logged"
              f"{', inside a checkpoint write' if trial['mid_save'] else ''}", flush=True)
    run(args.setup, out, *common, cache=cache, flags=["--resume"], timeout=1800)

    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    a, b = read(ref), read(out)
    steps_ok = [r["step"] for r in b] == list(range(1, args.steps + 1))
    loss_dev = max(abs(x["loss"] - y["loss"]) / max(abs(x["loss"]), 1e-12) for x, y in zip(a, b))
    lr_ok = all(x["lr"] == y["lr"] for x, y in zip(a, b))
    wa = load_file(str(ref / "hf_model" / "model.safetensors"))
    wb = load_file(str(out / "hf_model" / "model.safetensors"))
    wdiff = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    mid_save = sum(t["mid_save"] for t in trials)
    ok = steps_ok and loss_dev <= 1e-6 and lr_ok and wdiff <= 1e-6 and len(trials) == args.kills
    print(f"every step logged once: {steps_ok}; max relative loss difference {loss_dev:.2e}; lrs identical: {lr_ok}; "
          f"max |weight difference| {wdiff:.2e}")
    print(f"SUMMARY kill_soak: {len(trials)} kills ({mid_save} inside a checkpoint write) under {args.setup}, "
          f"{args.steps} steps: final weights max diff {wdiff:.2e} (goal <= 1e-6) -> {'PASS' if ok else 'FAIL'}; "
          f"wall {time.time() - t0:.0f} s")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
