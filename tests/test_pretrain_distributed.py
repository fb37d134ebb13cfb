"""Real 2-rank pre-training runs through `accelerate launch` on CPU (gloo), under ZeRO-2, ZeRO-3 and DDP."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from launching import REPO, accelerate_cmd, env, free_port, metrics, run
from wandb_records import read_run


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


def weights(out: Path) -> dict:
    return load_file(str(out / "hf_model" / "model.safetensors"))


@pytest.mark.parametrize("setup,stage", [("cpu_zero2", 2), ("cpu_zero3", 3)])
def test_two_ranks_train_on_disjoint_samples_and_loss_falls(tmp_path, cache, setup, stage):
    out = tmp_path / "run"
    proc = run(setup, out, "train.max_steps=60", "train.log_every=10", "train.trace_samples=true", cache=cache)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    assert all(r["world_size"] == 2 and r["zero_stage"] == stage for r in rows)
    assert all(len(r["lr"]) == 2 and r["tokens_per_second"] > 0 for r in rows)  # decay / no-decay groups
    assert rows[-1]["samples_seen"] == 60 * 16 * 2
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, [r["loss"] for r in rows]

    seen = [[int(p) for line in (out / "samples" / f"rank{r}.txt").read_text().split("\n") for p in line.split()]
            for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 60 * 16
    assert not set(seen[0]) & set(seen[1]), "ranks read overlapping samples"
    assert sorted(seen[0] + seen[1]) == list(range(60 * 16 * 2)), "the global stream has a hole"

    # the consolidated HF export loads with Auto classes and holds the trained weights
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    model = AutoModelForMaskedLM.from_pretrained(out / "hf_model")
    AutoTokenizer.from_pretrained(out / "hf_model")
    assert model.config.num_hidden_layers == 2
    assert "HF model:" in proc.stdout and "metrics:" in proc.stdout
    assert (out / "config.yaml").is_file()


@pytest.mark.parametrize("setup", ["cpu_zero2", "cpu_zero3", "cpu_ddp"])
def test_resume_repeats_the_uninterrupted_run(tmp_path, cache, setup):
    common = ["train.max_steps=8", "train.log_every=1", "train.save_every=3", "optim.scheduler=cosine",
              "optim.warmup_steps=2", "wandb.mode=offline"]
    full, part = tmp_path / "full", tmp_path / "part"
    run(setup, full, *common, cache=cache)
    run(setup, part, *common, "train.stop_at_step=5", cache=cache)
    assert [r["step"] for r in metrics(part)] == [1, 2, 3, 4, 5]
    assert not (part / "hf_model").exists()
    run(setup, part, *common, cache=cache, flags=["--resume"])

    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-6, abs=1e-6), (x, y)
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-9)
    wa, wb = weights(full), weights(part)
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6

    # wandb: one run id across the interruption, steps strictly increasing, summary = final loss
    runs = sorted((part / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    first, second = read_run(runs[0]), read_run(runs[1])
    assert first["run_id"] == second["run_id"]
    steps = [h["_step"] for h in first["history"] + second["history"]]
    assert steps == sorted(set(steps)) and steps[-1] == 8
    assert second["summary"]["loss"] == pytest.approx(b[-1]["loss"], rel=1e-6)


def test_two_machine_rendezvous_on_loopback(tmp_path, cache):
    """`--num_machines 2 --machine_rank 0/1`: two launchers, one process each, meet on 127.0.0.1."""
    out, port = tmp_path / "run", free_port()
    procs = []
    for rank in (0, 1):
        launcher = ["--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
                    "--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        cmd = accelerate_cmd("cpu_zero2", "pretrain.py", "configs/pretrain/tiny.yaml", out, "train.max_steps=6",
                             "train.log_every=3", launcher_args=launcher)
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env(cache), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-4000:]
    rows = metrics(out)
    assert [r["step"] for r in rows] == [3, 6]
    assert all(r["world_size"] == 2 and r["zero_stage"] == 2 for r in rows)


def test_bad_input_under_accelerate_is_one_line(tmp_path, cache):
    out = tmp_path / "run"
    proc = run("cpu_zero2", out, "train.max_stepz=3", cache=cache, check=False)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert errors == ["error: unknown config key 'train.max_stepz' (known: " + errors[0].split("(known: ")[1]]
    assert "Traceback" not in proc.stderr.split("error: ")[0]
    assert not out.exists()
