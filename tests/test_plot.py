"""Training curves (issue 11, item 3): every finished run writes `curves.png` from its `metrics.jsonl`, and
`python -m trainer.plot` redraws one run or overlays several."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import repo_root
import log_lines
from launching import run
from trainer import plot


@pytest.fixture
def logged():
    """The job log's messages (tests/log_lines.py) while the test runs."""
    with log_lines.logged() as lines:
        yield lines


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_size=(400, 200)) -> None:
    """A real PNG: the 8-byte signature, and an image matplotlib reads back at a non-trivial size."""
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.image as mpimg
    image = mpimg.imread(str(path))
    height, width = image.shape[:2]
    assert width >= min_size[0] and height >= min_size[1], (path, image.shape)
    assert image.std() > 0.01  # not a blank canvas


def _write_run(run_dir: Path, dev_tasks=(), steps=10, scale=1.0, torn=False, groups=None) -> Path:
    """A hand-written run dir: what the loop logs (training lines, dev lines per task, `average` with several)."""
    run_dir.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        lines.append({"step": step, "loss": scale * 5.0 / step, "lr": [1e-3 * (1 - step / steps), 1e-4],
                      "world_size": 1, "engine": "single", "zero_stage": 0, "precision": "fp32"})
        if dev_tasks and step % 5 == 0:
            accs = []
            for i, task in enumerate(dev_tasks):
                acc = 0.5 + 0.04 * step / (i + 1)
                accs.append(acc)
                lines.append({"step": step, "split": "dev", "task": task, "accuracy": acc, "error_rate": 1 - acc,
                              "macro_f1": acc - 0.1, "n": 100})
            if len(dev_tasks) > 1:
                lines.append({"step": step, "split": "dev", "task": "average", "accuracy": sum(accs) / len(accs)})
    text = "".join(json.dumps(ln) + "\n" for ln in lines)
    if torn:
        text += '{"step": 11, "loss": 0.4, "lr": [1e-'  # a kill mid-write
    (run_dir / "metrics.jsonl").write_text(text)
    if groups is not None:
        (run_dir / "param_groups.json").write_text(json.dumps(groups))
    return run_dir


def test_finished_finetuning_run_writes_curves(tmp_path, _isolated_cache):
    out = tmp_path / "ft"  # (the session's cache: the builtin tokenizer is trained once per test session)
    proc = run(None, out, "train.max_steps=12", "train.eval_every=6", "train.log_every=2", cache=_isolated_cache,
               script="finetune.py", config="configs/finetune/tiny.yaml", timeout=300)
    assert f"curves: {out / 'curves.png'}" in proc.stdout
    assert_png(out / "curves.png", min_size=(1200, 300))  # three panels: loss, lr, dev metrics


def test_torn_line_skipped_and_groups_labelled_by_parts(tmp_path):
    groups = [{"index": 0, "parts": ["encoder"], "task": None, "weight_decay": 0.01},
              {"index": 1, "parts": ["encoder"], "task": None, "weight_decay": 0.0}]
    run_dir = _write_run(tmp_path / "run", dev_tasks=("default",), torn=True, groups=groups)
    train, dev = plot.split_records(plot.read_metrics(run_dir / "metrics.jsonl"))
    assert [r["step"] for r in train] == list(range(1, 11)) and list(dev) == ["default"]
    assert plot.group_labels(run_dir, 2) == ["0: encoder (wd 0.01)", "1: encoder (wd 0)"]
    assert plot.group_labels(run_dir, 3) == ["group 0", "group 1", "group 2"]  # file does not match the lr list
    assert plot.plot_run(run_dir) == run_dir / "curves.png"
    assert_png(run_dir / "curves.png")


def test_cli_redraws_one_run_and_overlays_several(tmp_path):
    a = _write_run(tmp_path / "grid" / "lr_1e-4", dev_tasks=("trec", "imdb"))
    b = _write_run(tmp_path / "grid" / "lr_3e-4", dev_tasks=("trec", "imdb"), scale=0.7)
    c = _write_run(tmp_path / "no_dev", steps=6)
    cmd = [sys.executable, "-m", "trainer.plot"]
    one = subprocess.run([*cmd, str(c)], cwd=repo_root(), capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    assert_png(c / "curves.png")
    overlay = subprocess.run([*cmd, str(a), str(b), str(c)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "PYTHONPATH": str(repo_root())})
    assert overlay.returncode == 0, overlay.stderr
    assert_png(tmp_path / "curves_overlay.png")  # default: in the cwd
    target = tmp_path / "figs" / "two.png"
    assert plot.main([str(a), str(b), "--out", str(target)]) == 0
    assert_png(target)
    assert plot.run_labels([a, b]) == ["lr_1e-4", "lr_3e-4"]
    assert plot.run_labels([tmp_path / "x" / "trec", tmp_path / "y" / "trec"]) == ["x/trec", "y/trec"]
    bad = subprocess.run([*cmd, str(tmp_path / "missing")], cwd=repo_root(), capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and len(bad.stderr.splitlines()) == 1


def test_failure_to_plot_is_one_line_never_an_exception(tmp_path, logged):
    assert plot.write_curves(tmp_path / "empty") is None
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "metrics.jsonl").write_text("not json\n")
    assert plot.write_curves(tmp_path / "garbage") is None
    assert len(logged) == 2 and all(s.startswith("curves: not drawn") and "\n" not in s for s in logged)


@pytest.mark.parametrize("tasks", [("default",), ("a", "b", "c")])
def test_dev_lines_one_per_task_plus_average(tasks):
    dev = {}
    for t in (*tasks, *(("average",) if len(tasks) > 1 else ())):
        dev[t] = [{"step": 5, "accuracy": 0.5, "macro_f1": 0.4}, {"step": 10, "accuracy": 0.6, "macro_f1": 0.5}]
    labels = [line[0] for line in plot._dev_metric_lines(dev)]
    assert labels == (["accuracy", "macro-F1"] if len(tasks) == 1 else [*tasks, "average"])
