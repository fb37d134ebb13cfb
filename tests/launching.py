"""Run the real entry points as a user would: `accelerate launch` with the shipped CPU configs, 2 ranks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(cache: Path) -> dict:
    e = dict(os.environ)
    e.update(BERT_RECIPE_CACHE=str(cache), WANDB_SILENT="true", TOKENIZERS_PARALLELISM="false",
             PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return e


def entry(script: str) -> list[str]:
    """`launch/<script>` (a `.py` name: the shim users type) or a module of the package (`trainer.entry.finetune`),
    as the arguments of `python` or `accelerate launch`."""
    return [str(REPO / "launch" / script)] if script.endswith(".py") else ["-m", script]


def accelerate_cmd(setup: str | None, script: str, config: str, out: Path, *overrides: str, flags=(),
                   launcher_args=()) -> list[str]:
    if setup is None:  # one plain process, no launcher
        head = [sys.executable, *entry(script)]
    else:
        head = [sys.executable, "-m", "accelerate.commands.launch",
                "--config_file", str(REPO / "launch" / "accelerate" / f"{setup}.yaml"), *launcher_args]
        if "--main_process_port" not in launcher_args:
            head += ["--main_process_port", str(free_port())]
        head += entry(script)
    return [*head, "--config", str(REPO / config), f"output_dir={out}", *overrides, *flags]


def run(setup: str | None, out: Path, *overrides: str, cache: Path, flags=(), script="pretrain.py",
        config="configs/pretrain/tiny.yaml", timeout=600, check=True, launcher_args=(), extra_env=None):
    cmd = accelerate_cmd(setup, script, config, out, *overrides, flags=flags, launcher_args=launcher_args)
    proc = subprocess.run(cmd, cwd=REPO, env={**env(cache), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-6000:]}")
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


def log_messages(stdout: str) -> list[str]:
    """The messages of a run's job log: each line is `date time LEVEL [rank r] logger: message` (trainer/logs.py);
    other lines (DeepSpeed's, the progress bar) are left out."""
    found = []
    for line in stdout.splitlines():
        head, sep, rest = line.partition("] ")
        if sep and " [rank " in head and ": " in rest:
            found.append(rest.split(": ", 1)[1])
    return found
