"""Grid runner: a base run config × axes (any config key) × seeds; each point its own run, then the paper's tables
and figures from all of them (`grid_report.py`).

A point is an ordinary run of the stage's entry point (`python -m trainer.entry.<stage>`, or `accelerate launch
--config_file <launcher> -m trainer.entry.<stage>`) in `<output_dir>/points/<name>`, as a subprocess in this
process's working directory, so points are isolated from each other and from this process — and found wherever
the package is installed.
Resumable: a finished point (its results file exists) is skipped; an interrupted one (a checkpoint, no results)
continues with --resume; a point dir holding neither is started again. Shardable: `--shard i/n` runs every n-th
point from the i-th (machines or a SLURM array share the output dir); every shard then collects whatever points
have finished into `grid_results.jsonl` and redraws the report, so the last one to finish writes the whole grid."""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from .config import FinetuneConfig, GridConfig, PretrainConfig, RecipeConfig, load, to_dict
from .errors import UserError
from .grid_report import TITLES, write_report

# the source checkout when the package runs from one (an editable install): its configs/ and launch/accelerate/
# are then found from any working directory; otherwise only paths relative to the working directory are
REPO = Path(__file__).resolve().parents[1]
STAGES = {"finetune": FinetuneConfig, "pretrain": PretrainConfig, "recipe": RecipeConfig}
RESULTS = {"finetune": "eval_results.json", "pretrain": "hf_model", "recipe": "results.json"}
POINT_FILE = "grid_point.json"
GRID_RESULTS = "grid_results.jsonl"

log = logging.getLogger(__name__)


@dataclass
class Point:
    index: int
    name: str
    params: dict  # axis key → value (and "seed")
    out: Path

    def overrides(self) -> list[str]:
        return [f"{k}={_yaml_value(v)}" for k, v in self.params.items()]


def _yaml_value(value) -> str:
    """A value as the override parser reads it back (YAML flow style)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10**9).strip().removesuffix("\n...").strip()


def _slug(params: dict) -> str:
    text = "__".join(f"{k.split('.')[-1]}-{_yaml_value(v)}" for k, v in params.items())
    text = re.sub(r"[^A-Za-z0-9._=-]+", "_", text)
    if len(text) > 120:  # long values (paths): keep it readable and unique
        text = text[:100] + "-" + hashlib.sha1(text.encode()).hexdigest()[:10]
    return text


def _flatten(tree: dict, prefix: str = "", stop=lambda v: not isinstance(v, dict)) -> dict:
    """{"optim": {"lr": x}} (as `overrides.optim.lr=x` on the command line arrives) → {"optim.lr": x}."""
    out = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        out.update({full: value} if stop(value) else _flatten(value, full + ".", stop))
    return out


def normalise(cfg: GridConfig) -> GridConfig:
    """Dotted keys throughout: overrides down to their leaves (they merge into the base config key by key),
    axes down to their value lists."""
    cfg.overrides = _flatten(cfg.overrides)
    cfg.axes = _flatten(cfg.axes, stop=lambda v: not isinstance(v, dict) or not v)
    cfg.labels = _flatten(cfg.labels, stop=lambda v: not isinstance(v, dict) or not v)
    return cfg


def validate(cfg: GridConfig) -> None:
    if cfg.stage not in STAGES:
        raise UserError(f"stage must be one of {', '.join(STAGES)}; got {cfg.stage!r}")
    if not cfg.base:
        raise UserError("base is required: the run config every point starts from (e.g. configs/finetune/tiny.yaml)")
    if not base_path(cfg).is_file():
        raise UserError(f"base config not found: {cfg.base}")
    for key, values in cfg.axes.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"axes.{key} must be a non-empty list of values")
        if key in ("seed", "output_dir"):
            raise UserError(f"axes.{key}: {'use seeds' if key == 'seed' else 'each point has its own output dir'}")
    if cfg.study != "auto" and cfg.study not in TITLES:
        raise UserError(f"study must be auto or one of {', '.join(TITLES)}; got {cfg.study!r}")
    for key, names in cfg.labels.items():
        if key not in cfg.axes:
            raise UserError(f"labels.{key}: not an axis of this grid (axes: {', '.join(cfg.axes) or 'none'})")
        if not isinstance(names, list) or len(names) != len(cfg.axes[key]):
            raise UserError(f"labels.{key} must list one name per value of axes.{key} ({len(cfg.axes[key])})")
    if not cfg.seeds or not all(isinstance(s, int) for s in cfg.seeds):
        raise UserError(f"seeds must be a non-empty list of integers, got {cfg.seeds}")
    if cfg.launcher and not launcher_path(cfg).is_file():
        raise UserError(f"launcher (an accelerate config) not found: {cfg.launcher}")


def base_path(cfg: GridConfig) -> Path:
    path = Path(cfg.base)
    return path if path.is_absolute() or path.is_file() else REPO / path


def launcher_path(cfg: GridConfig) -> Path:
    """The accelerate config the points launch with: as given, else relative to the repo root."""
    path = Path(cfg.launcher)
    return path if path.is_absolute() or path.is_file() else REPO / path


def points(cfg: GridConfig) -> list[Point]:
    keys = list(cfg.axes)
    out = []
    for i, (values, seed) in enumerate(itertools.product(itertools.product(*cfg.axes.values()), cfg.seeds)):
        params = {**dict(zip(keys, values)), "seed": seed}
        out.append(Point(i, _slug(params), params, Path(cfg.output_dir) / "points" / _slug(params)))
    if len({p.name for p in out}) != len(out):
        raise UserError("two grid points got the same directory name; make the axis values distinct")
    return out


def check_points(cfg: GridConfig, grid: list[Point]) -> None:
    """Every point's full config must load (a typo in an axis key fails here, not after hours of other points)."""
    base = base_path(cfg)
    common = [f"{k}={_yaml_value(v)}" for k, v in cfg.overrides.items()]
    for p in grid:
        try:
            load(STAGES[cfg.stage], str(base), [*common, *p.overrides(), f"output_dir={p.out}"])
        except UserError as exc:
            raise UserError(f"grid point {p.name}: {exc}") from None


def _state(cfg: GridConfig, p: Point) -> str:
    """finished | interrupted (resume it) | fresh (start it, replacing whatever an aborted start left)."""
    if (p.out / RESULTS[cfg.stage]).exists():
        return "finished"
    if cfg.stage == "recipe" or (p.out / "checkpoints").is_dir() and any((p.out / "checkpoints").iterdir()):
        return "interrupted" if p.out.exists() else "fresh"
    return "fresh"


def command(cfg: GridConfig, p: Point, state: str) -> list[str]:
    module = f"trainer.entry.{cfg.stage}"
    if cfg.launcher:
        prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launcher_path(cfg)),
                  "-m", module]
    else:
        prefix = [sys.executable, "-m", module]
    flags = {"interrupted": ["--resume"] if cfg.stage != "recipe" else [], "fresh": ["--overwrite"]}[state]
    wandb = []
    if cfg.wandb.mode != "disabled":  # the points of a grid are one wandb group
        group = cfg.wandb.group or Path(cfg.output_dir).name
        wandb = [f"wandb.mode={cfg.wandb.mode}", f"wandb.project={cfg.wandb.project}", f"wandb.group={group}",
                 f"wandb.name={p.name}"] + ([f"wandb.entity={cfg.wandb.entity}"] if cfg.wandb.entity else [])
    common = [f"{k}={_yaml_value(v)}" for k, v in cfg.overrides.items()]
    return [*prefix, "--config", str(base_path(cfg)), *flags, *common, *p.overrides(), *wandb, f"output_dir={p.out}"]


def run(cfg: GridConfig, shard: tuple[int, int] = (0, 1), report_only: bool = False) -> bool:
    """Run this shard's unfinished points, then collect every finished point and write the report.
    True when the whole grid has finished."""
    normalise(cfg)
    validate(cfg)
    grid = points(cfg)
    check_points(cfg, grid)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grid.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    i, n = shard
    mine = [p for p in grid if p.index % n == i]
    failed = []
    if not report_only:
        log.info(f"grid {out}: {len(grid)} points ({len(cfg.axes)} axes × {len(cfg.seeds)} seeds); shard {i}/{n}: "
                 f"{len(mine)} points")
        for k, p in enumerate(mine, 1):
            state = _state(cfg, p)
            if state == "finished":
                log.info(f"[{k}/{len(mine)}] {p.name}: finished, skipped")
                continue
            p.out.mkdir(parents=True, exist_ok=True)
            (p.out / POINT_FILE).write_text(json.dumps({"params": p.params, "stage": cfg.stage}, indent=1))
            cmd = command(cfg, p, state)
            log.info(f"[{k}/{len(mine)}] {p.name}: {'resuming' if state == 'interrupted' else 'running'} "
                     f"(log: {p.out / 'grid.log'})")
            t0 = time.time()
            with open(p.out / "grid.log", "a") as f:
                f.write(f"$ {' '.join(cmd)}\n")
                f.flush()
                rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONUNBUFFERED="1"))
            if rc != 0:
                tail = (p.out / "grid.log").read_text().strip().splitlines()[-1:] or [""]
                log.warning(f"    failed (exit {rc}): {tail[0]}")
                failed.append(p.name)
            else:
                log.info(f"    done in {time.time() - t0:.0f}s")
    rows = collect(cfg, grid)
    with open(out / f".{GRID_RESULTS}.tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(out / f".{GRID_RESULTS}.tmp", out / GRID_RESULTS)
    written = write_report(cfg, rows, out)
    log.info(f"{len(rows)}/{len(grid)} points finished → {out / GRID_RESULTS}" +
             "".join(f"\n  {w}" for w in written))
    if failed:
        raise UserError(f"{len(failed)} grid point(s) failed: {', '.join(failed)} (see their grid.log); run the grid "
                        f"again to retry them")
    return len(rows) == len(grid)


def collect(cfg: GridConfig, grid: list[Point]) -> list[dict]:
    """One record per finished point: its params, the dev/test metrics and (fine-tuning) the dev curve.

    A point whose run dir is gone keeps its record from the grid's existing `grid_results.jsonl` (same params):
    a results folder copied without its runs (e.g. docs/results/) redraws from that file, and is not emptied."""
    rows, kept = [], 0
    previous = {r.get("point"): r for r in _records(Path(cfg.output_dir) / GRID_RESULTS)}
    for p in grid:
        if not p.out.exists() and previous.get(p.name, {}).get("params") == p.params:
            rows.append(previous[p.name])
            kept += 1
            continue
        if _state(cfg, p) != "finished":
            continue
        row = {"point": p.name, "params": p.params, "seed": p.params["seed"]}
        if cfg.stage == "finetune":
            results = json.loads((p.out / "eval_results.json").read_text())
            for split in ("dev", "test"):
                if split in results and "error_rate" in results[split]:  # single-label
                    row[f"{split}_error"] = results[split]["error_rate"]
                    row[f"{split}_accuracy"] = results[split]["accuracy"]
                    row[f"{split}_macro_f1"] = results[split]["macro_f1"]
                elif split in results:  # multi-label, regression: their headline metric (problems.headline)
                    row["metric"] = "micro_f1" if "micro_f1" in results[split] else "pearson"
                    row[f"{split}_score"] = results[split][row["metric"]]
            row["dev_curve"] = _dev_curve(p.out / "metrics.jsonl", row.get("metric", "error_rate"))
        elif cfg.stage == "recipe":
            row["table"] = json.loads((p.out / "results.json").read_text())
        else:
            losses = [r for r in _records(p.out / "metrics.jsonl") if "loss" in r]
            row["final_loss"] = losses[-1]["loss"] if losses else None
        rows.append(row)
    if kept:
        log.info(f"{kept} point(s) without a run dir taken from the existing {GRID_RESULTS}")
    return rows


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _dev_curve(path: Path, metric: str = "error_rate") -> list:
    """[(epoch, step, dev value)] of the run's dev evaluations (paper Fig. 2: the error rate; a multi-label or
    regression task's headline metric); epochs from the training lines."""
    records = _records(path)
    train = [r for r in records if "epoch" in r and r.get("step")]
    per_step = train[-1]["epoch"] / train[-1]["step"] if train else None
    return [[r["step"] * per_step if per_step else None, r["step"], r[metric]]
            for r in records if r.get("split") == "dev" and metric in r]


def parse_shard(text: Optional[str]) -> tuple[int, int]:
    if not text:
        return 0, 1
    m = re.fullmatch(r"(\d+)/(\d+)", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise UserError(f"--shard must look like i/n with 0 <= i < n, got {text!r}")
    return int(m.group(1)), int(m.group(2))
