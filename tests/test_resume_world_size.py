"""Resume on another number of ranks (trainer/reshard.py), with real `accelerate launch` runs on CPU.

With dropout off, training does not depend on how a global batch is split over ranks, so a run whose world size
changes at its checkpoints must follow the uninterrupted run: same samples per step, same per-group lrs, Adam
moments and step counts carried over — weights agree to float round-off (the checks below use 1e-5)."""
from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from launching import metrics, run
from wandb_records import read_run

NO_DROPOUT = ("model.config.hidden_dropout_prob=0", "model.config.attention_probs_dropout_prob=0")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def weights(out: Path) -> dict:
    return load_file(str(out / "hf_model" / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def ranks(n: int) -> list[str]:
    return ["--num_processes", str(n)]


def test_finetune_zero3_moves_2_1_3_ranks_like_the_uninterrupted_run(tmp_path, cache):
    # global batch 12 = 2 x 6 = 1 x 6 x accumulation 2 = 3 x 4; layer-wise decay over 4 layers: 5 distinct lrs
    common = [*NO_DROPOUT, "head.dropout=0", "train.max_steps=8", "train.micro_batch_size=6", "train.log_every=1",
              "train.eval_every=100", "optim.layer_decay=0.7", "optim.scheduler=cosine", "optim.warmup_steps=2"]
    ft = dict(cache=cache, script="finetune.py", config="configs/finetune/tiny.yaml")
    ref, moved = tmp_path / "ref", tmp_path / "moved"
    run("cpu_zero3", ref, *common, **ft)
    logs = []
    for n, stop in ((2, 2), (1, 4), (3, None)):  # shrink (accumulation appears), grow to an odd world
        extra = [f"train.stop_at_step={stop}"] if stop else []
        proc = run("cpu_zero3", moved, *common, *extra, **ft, flags=["--resume"] if logs else [],
                   launcher_args=ranks(n))
        logs.append(proc.stdout + proc.stderr)
    for log in logs[1:]:  # every resume changed the world size: the ZeRO-3 shards were converted
        assert "converting" in log and "universal checkpoint" in log
    # the global batch of 12 was kept: 1 rank accumulates 2 micro-batches of 6, 3 ranks take 4 each
    assert "world size 2 -> 1: keeping the global batch of 12 samples with micro_batch_size 6 x grad_accum 2" in logs[1]
    assert "world size 1 -> 3: keeping the global batch of 12 samples with micro_batch_size 4 x grad_accum 1" in logs[2]

    a = [r for r in metrics(ref) if "loss" in r]
    b = [r for r in metrics(moved) if "loss" in r]
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["world_size"] for r in b] == [2, 2, 1, 1, 3, 3, 3, 3]
    assert [r["samples_seen"] for r in b] == [r["samples_seen"] for r in a] == [12 * k for k in range(1, 9)]
    assert len(set(a[3]["lr"])) == 5  # per-layer lrs really differ
    for x, y in zip(a, b):
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-9), x["step"]
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]
    assert max_diff(weights(ref), weights(moved)) <= 1e-5


def test_pretrain_zero2_moves_2_to_3_ranks_reads_each_sample_once_and_keeps_the_wandb_run(tmp_path, cache):
    common = [*NO_DROPOUT, "train.max_steps=6", "train.micro_batch_size=6", "train.log_every=1",
              "train.trace_samples=true"]
    ref, moved = tmp_path / "ref", tmp_path / "moved"
    run("cpu_zero2", ref, *common, cache=cache)
    run("cpu_zero2", moved, *common, "train.stop_at_step=3", "wandb.mode=offline", cache=cache)
    assert [r["step"] for r in metrics(moved)] == [1, 2, 3] and not (moved / "hf_model").exists()
    proc = run("cpu_zero2", moved, *common, "wandb.mode=offline", cache=cache, flags=["--resume"],
               launcher_args=ranks(3))
    assert "micro_batch_size 4 x grad_accum 1 per rank" in proc.stdout

    seen = [int(p) for f in sorted((moved / "samples").glob("rank*.txt")) for p in f.read_text().split()]
    assert sorted(seen) == list(range(6 * 12)), "a sample was skipped or read twice across the move"
    b = metrics(moved)
    assert [r["world_size"] for r in b] == [2, 2, 2, 3, 3, 3]
    for x, y in zip(metrics(ref), b):
        assert y["lr"] == pytest.approx(x["lr"], rel=1e-9)
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
    assert max_diff(weights(ref), weights(moved)) <= 1e-5

    # wandb: one run id across the interruption, steps strictly increasing, summary = final loss
    runs = sorted((moved / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    first, second = read_run(runs[0]), read_run(runs[1])
    assert first["run_id"] == second["run_id"]
    steps = [h["_step"] for h in first["history"] + second["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    assert second["summary"]["loss"] == pytest.approx(b[-1]["loss"], rel=1e-6)


def test_ddp_checkpoint_resumed_on_one_process_steps_where_the_uninterrupted_run_does(tmp_path, cache):
    """DDP state is whole, so one process loads it directly — but accelerate's restored micro-step counter was
    counted with 2 ranks × accumulation 1; on 1 rank × accumulation 2 a stop at an odd step would put every
    optimizer step one micro-batch early. Losses must follow the uninterrupted run."""
    common = [*NO_DROPOUT, "head.dropout=0", "train.max_steps=6", "train.micro_batch_size=6", "train.log_every=1",
              "train.eval_every=100", "optim.layer_decay=0.8"]
    ft = dict(cache=cache, script="finetune.py", config="configs/finetune/tiny.yaml")
    ref, moved = tmp_path / "ref", tmp_path / "moved"
    run("cpu_ddp", ref, *common, **ft)
    run("cpu_ddp", moved, *common, "train.stop_at_step=3", **ft)
    proc = run(None, moved, *common, **ft, flags=["--resume"])
    assert "micro_batch_size 6 x grad_accum 2" in proc.stdout
    a, b = [r for r in metrics(ref) if "loss" in r], [r for r in metrics(moved) if "loss" in r]
    assert [r["world_size"] for r in b] == [2, 2, 2, 1, 1, 1]
    assert [r["engine"] for r in b] == ["ddp"] * 3 + ["single"] * 3
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), x["step"]
    assert max_diff(weights(ref), weights(moved)) <= 1e-5
