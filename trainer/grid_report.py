"""A grid's report: markdown tables mirroring the paper's (ours as mean ± sd over seeds, the paper's number beside
where it has one — `paper.py`) and PNG figures (matplotlib; SVG beside each). Which table and figures a grid gets
follows its axes (`study: auto`) or `study`; `labels` gives axis values display names (start models given as paths):

    truncation      text.strategy / text.chunk_pool      Table 2 + bar chart
    layer           head.layers / head.layer_pool        Table 3 + error by layer
    lr_decay        optim.lr × optim.layer_decay         Table 4 + lr × ξ heat map + dev error per epoch per lr
    forgetting      optim.lr                             dev error per epoch for each lr (Fig. 2)
    few_shot        data.few_shot_fraction (× a start model)  error vs training-set fraction (Fig. 4)
    pretrain_steps  pretrain.train.max_steps (recipe)    error vs further-pre-training steps (Fig. 3)
    stages          a recipe grid with seeds only            Tables 5–7 (task × stage) + bars per task and stage
    generic         anything else                        a table + error along the first axis"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from . import paper, problems
from .config import GridConfig

AUTO = [("text.strategy", "truncation"), ("text.chunk_pool", "truncation"), ("head.layers", "layer"),
        ("head.layer_pool", "layer"), ("data.few_shot_fraction", "few_shot"),
        ("pretrain.train.max_steps", "pretrain_steps")]


def study_of(cfg: GridConfig) -> str:
    if cfg.study != "auto":
        return cfg.study
    keys = set(cfg.axes)
    if cfg.stage == "recipe" and not keys:
        return "stages"
    if {"optim.lr", "optim.layer_decay"} <= keys:
        return "lr_decay"
    for key, study in AUTO:
        if key in keys:
            return study
    return "forgetting" if keys == {"optim.lr"} else "generic"


def _key(v) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def groups(rows: list[dict], axes: list[str]) -> dict:
    """axis values (tuple) → the rows of every seed of that combination, in grid order."""
    out = defaultdict(list)
    for r in rows:
        out[tuple(_key(r["params"][k]) for k in axes)].append(r)
    return out


def namer(cfg: GridConfig):
    """(axis key, value as `groups` keys it) → its display name from `labels` (else the value)."""
    names = {(k, _key(v)): str(n) for k, ns in cfg.labels.items() for v, n in zip(cfg.axes.get(k, []), ns)}
    return lambda key, value: names.get((key, value), value)


def _error(r: dict, stage_task: Optional[tuple] = None) -> Optional[float]:
    """The point's value: its test (else dev) error rate — or, for a multi-label or regression task, the metric
    in its `metric` (grid.collect; micro-F1, Pearson) —, or one task and stage of a recipe point's table."""
    if stage_task is not None:
        task, stage = stage_task
        return r.get("table", {}).get(task, {}).get(stage)
    return r.get("test_error", r.get("test_score", r.get("dev_error", r.get("dev_score"))))


def _dev(r: dict) -> Optional[float]:
    return r.get("dev_error", r.get("dev_score"))


METRIC_LABELS = {"error_rate": "error", "micro_f1": "micro-F1", "pearson": "Pearson ×100"}


def _metric(rows: list) -> str:
    """The metric of a fine-tuning grid's values (problems.headline): error_rate unless its task is another kind."""
    return next((r["metric"] for r in rows if "metric" in r), "error_rate")


def _stats(values: list) -> tuple[float, float, int]:
    v = np.array([x for x in values if x is not None], dtype=float) * 100
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _cell(values: list) -> str:
    mean, sd, n = _stats(values)
    if n == 0:
        return "–"
    return f"{mean:.2f} ± {sd:.2f}" if n > 1 else f"{mean:.2f}"


def paper_key(study: str, params: dict):
    if study == "truncation":
        s = params.get("text.strategy", "head")
        return f"hierarchical/{params.get('text.chunk_pool', 'mean')}" if s == "hierarchical" else s
    if study == "layer":
        layers = params.get("head.layers", -1)
        return f"{layers}/{params.get('head.layer_pool', 'concat')}" if isinstance(layers, str) else str(layers)
    if study == "lr_decay":
        return (float(params["optim.lr"]), float(params["optim.layer_decay"]))
    return None


PAPER_TABLES = {"truncation": paper.TRUNCATION, "layer": paper.LAYER, "lr_decay": paper.LR_DECAY}
TITLES = {"truncation": "Table 2 — long text: truncation and hierarchy", "layer": "Table 3 — which layer",
          "lr_decay": "Table 4 — layer-wise decayed learning rate (lr × ξ)",
          "forgetting": "Fig. 2 — learning rate and catastrophic forgetting", "few_shot": "Fig. 4 — few-shot",
          "pretrain_steps": "Fig. 3 — further pre-training steps", "generic": "Grid",
          "stages": "Tables 5–7 — test error per task and stage"}


def write_report(cfg: GridConfig, rows: list[dict], out: Path) -> list[str]:
    """Write `results.md` (and `<study>_*.png/svg` figures) under `out`; → the paths written."""
    study = study_of(cfg)
    axes = list(cfg.axes)
    by = groups(rows, axes)
    table = _table(cfg, study, axes, by, rows)
    (out / "results.md").write_text(table)
    written = [str(out / "results.md")]
    if rows:
        written += _figures(cfg, study, axes, by, rows, out)
    return written


def _table(cfg, study, axes, by, rows) -> str:
    show = namer(cfg)
    split = "test" if any("test_error" in r or "test_score" in r for r in rows) else "dev"
    metric = _metric(rows)
    what = METRIC_LABELS[metric]
    lines = [f"# {TITLES.get(study, 'Grid')}", "",
             f"{len(rows)} finished run(s); {'error rate' if what == 'error' else what} (%) as mean ± sd over "
             f"seeds {cfg.seeds}"
             + (f"; paper: Sun et al. 2019, {cfg.paper_dataset}" if cfg.paper_dataset else "") + ".", ""]
    if cfg.stage == "recipe":  # Tables 5–7: a row per task (per axis combination), a column per stage
        tasks, stages = _tasks_stages(rows)
        head = [*axes, "task", *stages]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for combo, rs in by.items():
            for t in tasks:
                lines.append("| " + " | ".join([*map(show, axes, combo), t,
                                                *[_cell([_error(r, (t, s)) for r in rs]) for s in stages]]) + " |")
        for t in tasks:
            ref = paper.stage_cells(t, stages)
            if ref:
                lines.append("| " + " | ".join([""] * len(axes) + ref) + " |")
        return "\n".join(lines) + "\n"
    ref = PAPER_TABLES.get(study)
    head = [*axes, f"dev {what}", f"{split} {what}", "seeds"] + (["paper"] if ref and cfg.paper_dataset else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for combo, rs in by.items():
        cells = [*map(show, axes, combo), _cell([_dev(r) for r in rs]), _cell([_error(r) for r in rs]),
                 str(len(rs))]
        if ref and cfg.paper_dataset:
            value = paper.lookup(ref, cfg.paper_dataset, paper_key(study, rs[0]["params"]))
            cells.append(f"{value:.2f}" if value is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    higher = problems.HIGHER_IS_BETTER[metric]
    best = (max if higher else min)(by.items(), key=lambda kv: _stats([_error(r) for r in kv[1]])[0], default=None)
    if best is not None:
        lines += ["", f"{'Highest' if higher else 'Lowest'} {split} {what}: "
                      f"{', '.join(f'{k}={show(k, v)}' for k, v in zip(axes, best[0]))}"]
    return "\n".join(lines) + "\n"


def _figures(cfg, study, axes, by, rows, out: Path) -> list[str]:
    from .plot import new_figure, save_figure
    written = []
    show = namer(cfg)

    def x_of(key, params):  # numeric where it can be, else the (display) string
        return _x(show(key, _key(params[key])))

    def subplots(figsize):
        fig, (ax,) = new_figure(1, figsize)
        return fig, ax

    def save(fig, name):
        fig.tight_layout()
        save_figure(fig, out / f"{name}.png", svg=True)
        written.append(str(out / f"{name}.png"))

    # a recipe's results.json holds test errors; fine-tuning points have test_error when a test split was given
    what = METRIC_LABELS[_metric(rows)]
    ylabel = (f"test {what} (%)" if cfg.stage == "recipe" or any("test_error" in r or "test_score" in r for r in rows)
              else f"dev {what} (%)")
    if cfg.stage == "recipe":
        cells = sorted({(t, s) for r in rows for t, st in r.get("table", {}).items() for s in st})
        if not axes:  # seeds only (Tables 5–7): bars per task, one per stage, the paper's number as a star
            _stage_bars(rows, out / "stages.png")
            return written + [str(out / "stages.png")]
        fig, ax = subplots((7, 4))
        xs = [x_of(axes[0], rs[0]["params"]) for rs in by.values()]
        for c in cells:
            ys = [_stats([_error(r, c) for r in rs]) for rs in by.values()]
            ax.errorbar(xs, [m for m, _, _ in ys], yerr=[s for _, s, _ in ys], marker="o", capsize=3,
                        label=f"{c[0]} {c[1]}")
        ax.set_xlabel(axes[0] if axes else "")
        ax.set_ylabel(ylabel)
        ax.set_title(TITLES.get(study, "Grid"))
        ax.legend(fontsize=7)
        save(fig, study)
        return written
    if study == "lr_decay":
        lrs = sorted({float(r["params"]["optim.lr"]) for r in rows})
        xis = sorted({float(r["params"]["optim.layer_decay"]) for r in rows}, reverse=True)
        grid = np.full((len(lrs), len(xis)), np.nan)
        for rs in groups(rows, ["optim.lr", "optim.layer_decay"]).values():  # one cell per (lr, ξ): all its seeds
            p = rs[0]["params"]
            grid[lrs.index(float(p["optim.lr"])), xis.index(float(p["optim.layer_decay"]))] = \
                _stats([_error(r) for r in rs])[0]
        fig, ax = subplots((1.3 * len(xis) + 2, 0.8 * len(lrs) + 1.8))
        im = ax.imshow(grid, cmap="viridis_r", aspect="auto")
        ax.set_xticks(range(len(xis)), [f"{x:g}" for x in xis])
        ax.set_yticks(range(len(lrs)), [f"{x:g}" for x in lrs])
        ax.set_xlabel("ξ (optim.layer_decay)")
        ax.set_ylabel("lr")
        for i in range(len(lrs)):
            for j in range(len(xis)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w", fontsize=9)
        fig.colorbar(im, ax=ax, label=ylabel)
        ax.set_title(TITLES["lr_decay"], fontsize=9)
        save(fig, "lr_decay_heatmap")
    if study in ("lr_decay", "forgetting"):
        fig, ax = subplots((6, 4))
        first_xi = rows[0]["params"].get("optim.layer_decay")
        for lr in sorted({float(r["params"]["optim.lr"]) for r in rows}):
            rs = [r for r in rows if float(r["params"]["optim.lr"]) == lr
                  and r["params"].get("optim.layer_decay") == first_xi and r.get("dev_curve")]
            if not rs:
                continue
            n = min(len(r["dev_curve"]) for r in rs)
            epochs = [p[0] if p[0] is not None else p[1] for p in rs[0]["dev_curve"][:n]]
            ys = np.mean([[100 * p[2] for p in r["dev_curve"][:n]] for r in rs], axis=0)
            ax.plot(epochs, ys, marker="o", label=f"lr {lr:g}")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"dev {what} (%)")
        ax.set_title(TITLES["forgetting"] + (f" (ξ = {first_xi})" if first_xi is not None else ""), fontsize=9)
        ax.legend()
        save(fig, "forgetting")
        if study == "lr_decay":
            return written
    # one line along the first axis, one per combination of the other axes
    categorical = len(axes) == 1 and not all(isinstance(x_of(axes[0], rs[0]["params"]), float) for rs in by.values())
    if study == "truncation" or not axes or categorical:  # bars: named settings, not a numeric axis
        fig, ax = subplots((max(5, 1.2 * len(by)), 4))
        labels = [" / ".join(map(show, axes, k)) for k in by] or ["run"]
        stats = [_stats([_error(r) for r in rs]) for rs in by.values()]
        ax.bar(range(len(stats)), [m for m, _, _ in stats], yerr=[s for _, s, _ in stats], capsize=4,
               label="ours")
        ref = PAPER_TABLES.get(study)
        if ref and cfg.paper_dataset:
            pv = [paper.lookup(ref, cfg.paper_dataset, paper_key(study, rs[0]["params"])) for rs in by.values()]
            ax.plot([i for i, v in enumerate(pv) if v is not None], [v for v in pv if v is not None], "k*",
                    markersize=10, label=f"paper ({cfg.paper_dataset})")
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(TITLES.get(study, "Grid"), fontsize=9)
        ax.legend()
        save(fig, study)
        return written
    fig, ax = subplots((6, 4))
    first, rest = axes[0], axes[1:]
    series = defaultdict(list)
    for combo, rs in by.items():
        series[combo[1:]].append((x_of(first, rs[0]["params"]), _stats([_error(r) for r in rs])))
    for other, pts in series.items():
        if all(isinstance(p[0], float) for p in pts):  # numbers in order; names in the grid's order
            pts.sort(key=lambda p: p[0])
        ax.errorbar([p[0] for p in pts], [p[1][0] for p in pts], yerr=[p[1][1] for p in pts], marker="o", capsize=3,
                    label=", ".join(show(k, v) if k in cfg.labels else f"{k.split('.')[-1]}={_short(v)}"
                                    for k, v in zip(rest, other)) or "ours")
    ref = PAPER_TABLES.get(study)
    if ref and cfg.paper_dataset and not rest:
        pv = [(x_of(first, rs[0]["params"]), paper.lookup(ref, cfg.paper_dataset, paper_key(study, rs[0]["params"])))
              for rs in by.values()]
        pv = sorted(p for p in pv if p[1] is not None)
        if pv:
            ax.plot([p[0] for p in pv], [p[1] for p in pv], "k--*", label=f"paper ({cfg.paper_dataset})")
    if study == "few_shot":
        ax.set_xscale("log")
    ax.set_xlabel(first)
    ax.set_ylabel(ylabel)
    ax.set_title(TITLES.get(study, "Grid"), fontsize=9)
    ax.legend(fontsize=8)
    save(fig, study)
    return written


def _tasks_stages(rows: list) -> tuple[list, list]:
    """A recipe grid's tasks and stage labels, in the order the points' results list them."""
    tasks = list(dict.fromkeys(t for r in rows for t in r.get("table", {})))
    stages = list(dict.fromkeys(s for r in rows for st in r.get("table", {}).values() for s in st))
    return tasks, stages


def _stage_bars(rows: list, out: Path) -> None:
    """Tables 5–7 as grouped bars (`plot.plot_results_table`): mean ± sd over the seeds per task and stage."""
    from .plot import plot_results_table
    tasks, stages = _tasks_stages(rows)
    stats = {t: {s: _stats([_error(r, (t, s)) for r in rows]) for s in stages} for t in tasks}
    mean = {t: {s: m / 100 for s, (m, _, n) in row.items() if n} for t, row in stats.items()}
    sd = {t: {s: d / 100 for s, (_, d, n) in row.items() if n} for t, row in stats.items()}
    plot_results_table(mean, stages, out, TITLES["stages"], sd=sd, svg=True)


def _x(value):
    """A numeric x for plotting; non-numeric values keep their order of appearance via a string axis."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _short(value: str) -> str:
    """A legend label: a path shortened to its last two parts."""
    parts = str(value).rstrip("/").split("/")
    return "/".join(parts[-2:]) if len(parts) > 2 else str(value)
