"""Tests for the SLURM launch template (launch/slurm/, trainer/entry/node_command.py)."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.entry import node_command

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm" / "node_command.py"  # the shim users type; `-m trainer.entry.node_command`
SBATCH = REPO / "launch" / "slurm" / "pretrain.sbatch"


def _clean_env(**slurm):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k != "MAIN_PROCESS_PORT"}
    env.update(slurm)
    return env


def _run(args, **slurm):
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=_clean_env(**slurm),
                          capture_output=True, text=True, cwd=REPO, timeout=60)


TWO_BY_FOUR = dict(SLURM_JOB_NODELIST="gpu[07-08]", SLURM_NNODES="2",
                   SLURM_NODEID="0", SLURM_GPUS_ON_NODE="4")
SCRIPT_ARGS = ["-m", "trainer.entry.pretrain", "--config", "configs/pretrain/my run.yaml", "--resume"]


def _flag(tokens, name):
    return tokens[tokens.index(name) + 1]


# --------------------------------------------------------------------------- #
# Dry run
# --------------------------------------------------------------------------- #
def test_dry_run_two_nodes_four_gpus():
    proc = _run(["--dry-run", "--", *SCRIPT_ARGS], **TWO_BY_FOUR)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    for rank, (line, host) in enumerate(zip(lines, ["gpu07", "gpu08"])):
        prefix = f"node {rank} ({host}): "
        assert line.startswith(prefix)
        tokens = shlex.split(line[len(prefix):])
        assert tokens[:2] == ["accelerate", "launch"]
        assert _flag(tokens, "--config_file") == "launch/accelerate/multi_node.yaml"
        assert _flag(tokens, "--num_machines") == "2"
        assert _flag(tokens, "--num_processes") == "8"
        assert _flag(tokens, "--machine_rank") == str(rank)
        assert _flag(tokens, "--main_process_ip") == "gpu07"
        assert _flag(tokens, "--main_process_port") == "29500"
        assert _flag(tokens, "--rdzv_backend") == "static"
        assert "--same_network" in tokens
        # The script and its args come last, unchanged (quoting preserved).
        assert tokens[-len(SCRIPT_ARGS):] == SCRIPT_ARGS
        assert tokens[tokens.index("--same_network") + 1:] == SCRIPT_ARGS


def test_dry_run_does_not_need_node_id_and_honours_options():
    env = dict(TWO_BY_FOUR, MAIN_PROCESS_PORT="31000")
    del env["SLURM_NODEID"]
    proc = _run(["--dry-run", "--config_file", "cfg.yaml", "--", "train.py"], **env)
    assert proc.returncode == 0, proc.stderr
    tokens = shlex.split(proc.stdout.splitlines()[1].split(": ", 1)[1])
    assert _flag(tokens, "--config_file") == "cfg.yaml"
    assert _flag(tokens, "--main_process_port") == "31000"
    assert tokens[-1] == "train.py"
    # --port beats the environment.
    proc = _run(["--dry-run", "--port", "1234", "--", "train.py"], **env)
    assert "--main_process_port 1234" in proc.stdout


def test_gpus_per_node_typed_form():
    env = dict(TWO_BY_FOUR, SLURM_GPUS_PER_NODE="h100:4")
    del env["SLURM_GPUS_ON_NODE"]
    proc = _run(["--dry-run", "--", "train.py"], **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--num_processes 8 ") == 2


def test_gpus_per_node_argument_fallback():
    env = dict(TWO_BY_FOUR)
    del env["SLURM_GPUS_ON_NODE"]
    proc = _run(["--dry-run", "--gpus-per-node", "3", "--", "train.py"], **env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("--num_processes 6 ") == 2


@pytest.mark.parametrize("value,expected", [("4", 4), ("h100:4", 4), ("gpu:h100:8", 8),
                                            ("a100:2,v100:2", 4)])
def test_gpus_per_node_parsing(value, expected):
    assert node_command.gpus_per_node({"SLURM_GPUS_PER_NODE": value}, None) == expected


def test_gpus_on_node_wins_over_per_node():
    env = {"SLURM_GPUS_ON_NODE": "2", "SLURM_GPUS_PER_NODE": "h100:8"}
    assert node_command.gpus_per_node(env, 5) == 2


# --------------------------------------------------------------------------- #
# Errors: one line on stderr, exit code 2
# --------------------------------------------------------------------------- #
def _assert_one_line_error(proc, needle):
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


def test_missing_nodelist_is_a_clean_error():
    env = dict(TWO_BY_FOUR)
    del env["SLURM_JOB_NODELIST"]
    _assert_one_line_error(_run(["--dry-run", "--", "train.py"], **env), "SLURM_JOB_NODELIST")


@pytest.mark.parametrize("change,needle", [
    ({"SLURM_NNODES": "3"}, "SLURM_NNODES"),
    ({"SLURM_NNODES": "two"}, "SLURM_NNODES"),
    ({"SLURM_NODEID": "2"}, "SLURM_NODEID"),
    ({"SLURM_GPUS_ON_NODE": "0"}, "SLURM_GPUS_ON_NODE"),
    ({"SLURM_JOB_NODELIST": "gpu[07-08"}, "hostlist"),
    ({"SLURM_JOB_NODELIST": "gpu[08-07]"}, "hostlist"),
])
def test_invalid_slurm_vars_are_clean_errors(change, needle):
    env = dict(TWO_BY_FOUR, **change)
    _assert_one_line_error(_run(["--dry-run", "--", "train.py"], **env), needle)


def test_missing_node_id_is_an_error_without_dry_run():
    env = dict(TWO_BY_FOUR)
    del env["SLURM_NODEID"]
    # Fails on validation, before anything is exec'd.
    _assert_one_line_error(_run(["--", "train.py"], **env), "SLURM_NODEID")


def test_exec_runs_the_command_for_this_node(tmp_path):
    # A fake `accelerate` on PATH records its argv: the real exec path, no GPUs needed.
    if shutil.which("sh") is None:
        pytest.skip("no /bin/sh")
    fake = tmp_path / "accelerate"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = dict(TWO_BY_FOUR, SLURM_NODEID="1", PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--", *SCRIPT_ARGS],
                          env=_clean_env(**env), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert "INFO" in out[0] and "node 1 (gpu08): accelerate launch " in out[0]  # a job-log line, then the exec
    argv = out[1:]
    assert argv[0] == "launch"
    assert _flag(argv, "--machine_rank") == "1"
    assert _flag(argv, "--main_process_ip") == "gpu07"
    assert argv[-len(SCRIPT_ARGS):] == SCRIPT_ARGS


def test_missing_script_is_a_usage_error():
    proc = _run(["--dry-run"], **TWO_BY_FOUR)
    assert proc.returncode == 2
    proc = _run(["--dry-run", "--"], **TWO_BY_FOUR)
    assert proc.returncode == 2


# --------------------------------------------------------------------------- #
# Hostlist expander
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("hostlist,expected", [
    ("gpu07", ["gpu07"]),
    ("gpu[07-08]", ["gpu07", "gpu08"]),
    ("gpu[01-02,05]", ["gpu01", "gpu02", "gpu05"]),
    ("node-a1,node-b[3-4]", ["node-a1", "node-b3", "node-b4"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[008-010]", ["n008", "n009", "n010"]),
    ("a[1-2],b,c[09-10]", ["a1", "a2", "b", "c09", "c10"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("host.domain[3]", ["host.domain3"]),
])
def test_expand_hostlist(hostlist, expected):
    assert node_command.expand_hostlist(hostlist) == expected


@pytest.mark.parametrize("bad", ["gpu[01-02", "gpu01]", "gpu[a-b]", "gpu[05-03]", "a,,b", "g[]"])
def test_expand_hostlist_rejects_malformed(bad):
    with pytest.raises(ValueError):
        node_command.expand_hostlist(bad)


# --------------------------------------------------------------------------- #
# sbatch template
# --------------------------------------------------------------------------- #
def test_sbatch_template_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not installed")
    proc = subprocess.run([bash, "-n", str(SBATCH)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_template_contents():
    text = SBATCH.read_text()
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8",
                      "--requeue", "--signal=B:USR1@180"):
        assert f"#SBATCH {directive}" in text
    assert "srun --kill-on-bad-exit=1" in text
    assert "python -m trainer.entry.supervise python -m trainer.entry.node_command -- \\\n" \
           "    -m trainer.entry.pretrain " in text
    assert "trap " in text and "scontrol requeue" in text
    # sbatch stops reading directives at the first command line.
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    first_cmd = next(i for i, l in enumerate(lines) if not l.startswith("#"))
    assert not any(l.startswith("#SBATCH") for l in lines[first_cmd:])
