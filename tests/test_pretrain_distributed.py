"""Real 2-rank pre-training runs through `accelerate launch` on CPU (gloo). Stop/resume: tests/test_resume_world_size.py
(ZeRO-2, with the wandb run), tests/test_matrix.py (ZeRO-3, DDP, offload), tests/test_sigkill.py (kill -9)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from launching import REPO, accelerate_cmd, env, free_port, metrics, run


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


def weights(out: Path) -> dict:
    return load_file(str(out / "hf_model" / "model.safetensors"))


# ZeRO-3, the engine that partitions the weights too; ZeRO-2 pre-training: tests/test_resume_world_size.py
@pytest.mark.parametrize("setup,stage", [("cpu_zero3", 3)])
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
