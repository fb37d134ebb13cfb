"""launch/grid.py: a 2×2 grid on the tiny model end to end — points run, an interrupted one resumed, finished ones
skipped on a rerun, grid_results.jsonl, the markdown table and the figures (valid PNGs) — plus sharding and the
refusals."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launching import REPO, env, error_lines
from trainer import grid
from trainer.config import FinetuneConfig, GridConfig, load

TINY_GRID = REPO / "configs" / "grid" / "tiny.yaml"
STEPS = "overrides={train.max_steps: 12, train.eval_every: 4, train.log_every: 4}"


def run_grid(out: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/grid.py", "--config", str(TINY_GRID), f"output_dir={out}",
                           STEPS, *args], cwd=REPO, env=env(cache), capture_output=True, text=True, timeout=900)


def is_png(path: Path) -> bool:
    import matplotlib.image as mpimg
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and mpimg.imread(str(path)).shape[0] > 50


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The tiny grid, with its third point interrupted beforehand (a checkpoint at step 4, no results)."""
    root = tmp_path_factory.mktemp("grid")
    out, cache = root / "grid", root / "cache"
    cfg = load(GridConfig, str(TINY_GRID), [f"output_dir={out}", STEPS])
    points = grid.points(cfg)
    stopped = points[2]
    cmd = grid.command(cfg, stopped, "fresh") + ["train.stop_at_step=4", "train.save_every=4"]
    proc = subprocess.run(cmd, cwd=REPO, env=env(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (stopped.out / "eval_results.json").exists()
    first = run_grid(out, cache)
    assert first.returncode == 0, first.stderr[-3000:]
    return out, cache, points, stopped, first


def test_every_point_runs_and_the_interrupted_one_resumes(ran):
    out, _, points, stopped, first = ran
    rows = [json.loads(line) for line in (out / "grid_results.jsonl").read_text().splitlines()]
    assert [r["point"] for r in rows] == [p.name for p in points] and len(rows) == 4
    for r, p in zip(rows, points):
        assert r["params"] == p.params
        result = json.loads((p.out / "eval_results.json").read_text())
        assert r["test_error"] == result["test"]["error_rate"] and r["dev_error"] == result["dev"]["error_rate"]
        assert [c[1] for c in r["dev_curve"]] == [4, 8, 12]  # the dev error at every evaluation (Fig. 2)
        config = (p.out / "config.yaml").read_text()
        assert f"lr: {p.params['optim.lr']}" in config and f"layer_decay: {p.params['optim.layer_decay']}" in config
    log = (stopped.out / "grid.log").read_text()
    assert "--resume" in log and "resumed from" in log and "step_00000004" in log
    assert "resuming" in first.stdout and first.stdout.count("running") == 3


def test_the_table_and_figures(ran):
    out = ran[0]
    table = (out / "results.md").read_text()
    assert table.startswith("# Table 4")
    body = [line for line in table.splitlines() if line.startswith("| 0.00")]
    assert len(body) == 4  # one row per point (one seed each)
    rows = [json.loads(line) for line in (out / "grid_results.jsonl").read_text().splitlines()]
    for r in rows:  # each row shows its own point's test error
        lr, xi = r["params"]["optim.lr"], r["params"]["optim.layer_decay"]
        line = next(b for b in body if b.startswith(f"| {lr} | {xi} |"))
        assert f"{100 * r['test_error']:.2f}" in line
    for name in ("lr_decay_heatmap", "forgetting"):
        assert is_png(out / f"{name}.png") and (out / f"{name}.svg").is_file()


def test_a_rerun_skips_finished_points(ran):
    out, cache, points, _, _ = ran
    before = {p.name: (p.out / "metrics.jsonl").read_text() for p in points}
    again = run_grid(out, cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished, skipped") == 4 and "running" not in again.stdout
    assert {p.name: (p.out / "metrics.jsonl").read_text() for p in points} == before


def test_nested_overrides_and_axes_become_dotted_keys(tmp_path):
    cfg = load(GridConfig, str(TINY_GRID), [f"output_dir={tmp_path}", "overrides.model.config.hidden_size=32",
                                            "axes.optim.lr=[1.0e-3]"])
    grid.normalise(cfg)
    assert cfg.overrides["model.config.hidden_size"] == 32 and cfg.overrides["train.max_steps"] == 60
    assert cfg.axes == {"optim.lr": [1.0e-3], "optim.layer_decay": [1.0, 0.8]}
    p = grid.points(cfg)[0]
    resolved = load(FinetuneConfig, str(REPO / "configs/finetune/tiny.yaml"),
                    grid.command(cfg, p, "fresh")[grid.command(cfg, p, "fresh").index("--overwrite") + 1:])
    assert resolved.model.config["hidden_size"] == 32 and resolved.model.config["num_hidden_layers"] == 4  # merged


def test_shards_split_the_points(tmp_path):
    cfg = load(GridConfig, str(TINY_GRID), [f"output_dir={tmp_path}", "seeds=[1, 2]"])
    names = [p.name for p in grid.points(cfg)]
    assert len(names) == 8 and len(set(names)) == 8
    shards = [[p.name for p in grid.points(cfg) if p.index % 3 == i] for i in range(3)]
    assert sorted(sum(shards, [])) == sorted(names) and all(shards)
    assert grid.parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "a/b", "1"):
        with pytest.raises(Exception, match="--shard"):
            grid.parse_shard(bad)


@pytest.mark.parametrize("override, match", [
    ("axes={optim.lrr: [1.0e-3]}", "grid point .*optim.lrr"),
    ("base=configs/finetune/nope.yaml", "base config not found"),
    ("axes={optim.lr: 1.0e-3}", "axes.optim.lr must be a non-empty list"),
    ("stage=train", "stage must be one of"),
    ("study=nope", "study must be auto or one of"),
    ("labels={optim.lr: [a]}", "labels.optim.lr must list one name per value of axes.optim.lr"),
    ("labels={seed: [a]}", "labels.seed: not an axis"),
])
def test_bad_grid_config_is_one_line_before_any_run(tmp_path, override, match):
    proc = subprocess.run([sys.executable, "launch/grid.py", "--config", str(TINY_GRID), f"output_dir={tmp_path / 'g'}",
                           override], cwd=REPO, env=env(tmp_path / "cache"), capture_output=True, text=True, timeout=300)
    errors = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    import re
    assert re.search(match, errors[0]), errors[0]
    assert not (tmp_path / "g" / "points").exists()


def test_points_share_one_wandb_group_when_enabled(tmp_path):
    cfg = load(GridConfig, str(TINY_GRID), [f"output_dir={tmp_path / 'my-grid'}", "wandb.mode=offline"])
    grid.normalise(cfg)
    cmds = [grid.command(cfg, p, "fresh") for p in grid.points(cfg)]
    assert all("wandb.mode=offline" in c and "wandb.group=my-grid" in c for c in cmds)
    assert len({next(a for a in c if a.startswith("wandb.name=")) for c in cmds}) == len(cmds)  # one run per point
    off = load(GridConfig, str(TINY_GRID), [f"output_dir={tmp_path}"])
    assert not any(a.startswith("wandb.") for a in grid.command(off, grid.points(off)[0], "fresh"))


def test_recipe_grid_table_has_a_row_per_task_and_the_papers_numbers(tmp_path):
    """A recipe grid over seeds only: Tables 5–7's shape (task × stage, mean ± sd) with the paper's BERT-base
    number under each task it has, and grouped bars per task (stages.png)."""
    from trainer.grid_report import write_report
    cfg = load(GridConfig, str(TINY_GRID), ["stage=recipe", "axes={}", "seeds=[1, 2]"])
    grid.normalise(cfg)
    rows = [{"params": {"seed": s}, "table": {"imdb": {"FiT": e, "MFiT-FiT": e - 0.01}, "sst2": {"FiT": 0.2}}}
            for s, e in ((1, 0.10), (2, 0.12))]
    written = write_report(cfg, rows, tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("# Tables 5–7")
    assert "| task | FiT | MFiT-FiT |" in table
    assert "| imdb | 11.00 ± 1.41 | 10.00 ± 1.41 |" in table and "| sst2 | 20.00 ± 0.00 | – |" in table
    assert "| *imdb: paper, BERT-base* | *5.40* | *5.36* |" in table and "sst2: paper" not in table
    assert is_png(tmp_path / "stages.png") and str(tmp_path / "stages.png") in written
    assert "test error (%)" in (tmp_path / "stages.svg").read_text()  # a recipe reports test errors


def test_labels_name_axis_values_in_tables_and_figures(tmp_path):
    """Start models given as paths get display names; named (non-numeric) settings are drawn as bars."""
    from trainer.grid_report import write_report
    cfg = load(GridConfig, str(TINY_GRID), ["axes={model.name_or_path: [/a/long/path/m1, /b/m2]}",
                                            "labels={model.name_or_path: [FiT, ITPT-FiT]}", "seeds=[1]"])
    grid.normalise(cfg)
    grid.validate(cfg)
    rows = [{"params": {"model.name_or_path": m, "seed": 1}, "test_error": e, "dev_error": e}
            for m, e in (("/a/long/path/m1", 0.3), ("/b/m2", 0.2))]
    write_report(cfg, rows, tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert "| FiT | 30.00 | 30.00 | 1 |" in table and "| ITPT-FiT | 20.00 | 20.00 | 1 |" in table
    assert "/a/long/path" not in table and "Lowest test error: model.name_or_path=ITPT-FiT" in table
    assert is_png(tmp_path / "generic.png")


@pytest.mark.parametrize("study", sorted(p.name for p in (REPO / "docs" / "results").iterdir() if p.is_dir()))
def test_published_results_redraw_identically_from_their_grid_results(tmp_path, study):
    """docs/results/<study> holds no run dirs: `--report-only` on a copy of its grid_results.jsonl keeps every
    record (the file is not emptied) and writes the same results.md, byte for byte, and its figures."""
    src = REPO / "docs" / "results" / study
    (tmp_path / grid.GRID_RESULTS).write_bytes((src / grid.GRID_RESULTS).read_bytes())
    cfg = load(GridConfig, str(src / "grid.yaml"), [f"output_dir={tmp_path}"])
    grid.run(cfg, report_only=True)
    assert (tmp_path / grid.GRID_RESULTS).read_bytes() == (src / grid.GRID_RESULTS).read_bytes()
    assert (tmp_path / "results.md").read_text() == (src / "results.md").read_text()
    for figure in src.glob("*.png"):
        assert (tmp_path / figure.name).stat().st_size > 0, figure.name
