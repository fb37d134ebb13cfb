"""Training curves as PNG, drawn from a run's `metrics.jsonl`: what a run did, seen at a glance.

Every finished training run (pre-training, fine-tuning, multi-task; each recipe stage is such a run) writes
`<output_dir>/curves.png` — loss, the lr of every parameter group (log scale), and the dev metrics when the run
evaluated — through `write_curves`, which never raises: a figure is a convenience, and a finished run must not fail
because of it. The same figure can be redrawn, or several runs overlaid, from the command line:

    python -m trainer.plot RUN_DIR                       # → RUN_DIR/curves.png
    python -m trainer.plot RUN_A RUN_B … [--out FILE]    # loss and dev accuracy overlaid → ./curves_overlay.png

matplotlib is imported inside the drawing functions (standalone Agg figures, no pyplot: no display, safe on cluster
nodes and in worker processes), so importing this module — and a run that stops before its end — costs nothing."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import EXIT_USER_ERROR, UserError

CURVES = "curves.png"
OVERLAY = "curves_overlay.png"
DPI = 110
_PANEL = (5.4, 3.9)  # inches per panel: readable at dpi 110 side by side
_STYLES = ("-", "--", "-.", ":")
_MAX_LABEL = 42  # characters of a param-group label before its parts are abbreviated

log = logging.getLogger(__name__)


def read_metrics(path: Path) -> list[dict]:
    """The JSON lines of a `metrics.jsonl`, in file order. A line that is not a JSON object is skipped: a run
    killed mid-write leaves a torn last line, and a figure should still be drawn from the rest."""
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
    return records


def split_records(records: list[dict]) -> tuple[list[dict], dict[str, list[dict]]]:
    """(training lines, {task: dev lines}), each sorted by step. Training lines carry `loss` and `lr`; dev lines
    carry `split: dev` and a `task` (`default` for a single-task run, `average` next to a multi-task run's tasks).
    A step logged twice (a resumed run redoes the lines after its checkpoint, but a copied file may hold both)
    keeps its last line, so every curve is a function of the step."""
    train: dict = {}
    dev: dict[str, dict] = {}
    for r in records:
        if r.get("split") == "dev":
            dev.setdefault(str(r.get("task", "default")), {})[r["step"]] = r
        elif "loss" in r:
            train[r["step"]] = r
    return ([train[s] for s in sorted(train)],
            {task: [lines[s] for s in sorted(lines)] for task, lines in dev.items()})


def group_labels(run_dir: Path, count: int) -> list[str]:
    """One legend label per optimizer parameter group, in the order of the logged `lr` list: the group's parts
    (embeddings, layer_3, head, encoder …) and task from `param_groups.json` when the run wrote one, its weight
    decay where groups share their parts (decay / no-decay twins), else just the index."""
    path = Path(run_dir) / "param_groups.json"
    groups = None
    if path.is_file():
        try:
            groups = json.loads(path.read_text())
        except ValueError:
            groups = None
    if not isinstance(groups, list) or len(groups) != count:
        return [f"group {i}" for i in range(count)]
    described = []
    for i, g in enumerate(groups):
        parts = [str(p) for p in g.get("parts") or []]
        text = ", ".join(parts)
        if len(text) > _MAX_LABEL and len(parts) > 2:
            text = f"{parts[0]} … {parts[-1]} ({len(parts)} parts)"
        if g.get("task") and str(g["task"]) not in parts:
            text = f"{g['task']}: {text}" if text else str(g["task"])
        described.append(text or f"group {i}")
    labels = []
    for i, (g, text) in enumerate(zip(groups, described)):
        twins = described.count(text) > 1
        labels.append(f"{i}: {text}" + (f" (wd {g.get('weight_decay', 0):g})" if twins else ""))
    return labels


def new_figure(panels: int, size: tuple):
    """A standalone Agg figure with `panels` axes side by side. No pyplot: no global figure registry (nothing to
    leak or close in a long-lived process), no backend selection that could reach for a display on a cluster
    node, and a faster import at the end of every run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, panels, squeeze=False)[0]


DEV_SCORES = ("accuracy", "micro_f1", "pearson")  # the score drawn per task kind (problems.py): all higher-better


def _dev_score(lines: list[dict]) -> Optional[str]:
    return next((k for k in DEV_SCORES if any(isinstance(r.get(k), (int, float)) for r in lines)), None)


def _dev_metric_lines(dev: dict[str, list[dict]]) -> list[tuple[str, list, list, dict]]:
    """(label, steps, values, style) for the dev panel: each task's score — accuracy, or micro-F1 (multi-label) or
    Pearson (regression) —, the average accuracy (multi-task) drawn last and bold; a single-task run also shows its
    macro-F1 (dashed) — on skewed labels the two disagree."""
    lines = []
    tasks = [t for t in dev if t != "average"]
    for task in tasks:
        key = _dev_score(dev[task])
        pts = [(r["step"], r[key]) for r in dev[task] if isinstance(r.get(key), (int, float))] if key else []
        if pts:
            name = ("" if task == "default" else task) + ("" if key == "accuracy" else f" {key}")
            lines.append((name.strip() or key, *map(list, zip(*pts)), {"marker": "o"}))
    if len(tasks) == 1:
        pts = [(r["step"], r["macro_f1"]) for r in dev[tasks[0]] if isinstance(r.get("macro_f1"), (int, float))]
        if pts:
            lines.append(("macro-F1", *map(list, zip(*pts)), {"marker": "s", "linestyle": "--"}))
    pts = [(r["step"], r["accuracy"]) for r in dev.get("average", []) if isinstance(r.get("accuracy"), (int, float))]
    if pts:
        lines.append(("average", *map(list, zip(*pts)), {"marker": "o", "color": "black", "linewidth": 2.2}))
    return lines


def _marker(n: int) -> dict:
    return {"marker": "o", "markersize": 3} if n <= 40 else {}


def plot_run(run_dir: Path, out: Optional[Path] = None) -> Path:
    """Draw one run's curves (loss; lr per group; dev metrics if any) → `out` (default RUN_DIR/curves.png)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl (not a training run's output dir?)")
    train, dev = split_records(read_metrics(metrics))
    if not train and not dev:
        raise UserError(f"{metrics} holds no training or dev lines to plot")
    out = Path(out) if out else run_dir / CURVES
    dev_lines = _dev_metric_lines(dev)
    panels = 2 + bool(dev_lines)
    fig, axes = new_figure(panels, (_PANEL[0] * panels, _PANEL[1]))
    steps = [r["step"] for r in train]

    ax = axes[0]
    losses = [r["loss"] for r in train]
    ax.plot(steps, losses, color="tab:blue", **_marker(len(steps)))
    ax.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    ax.grid(alpha=0.3)
    if not steps:
        ax.text(0.5, 0.5, "no training lines", ha="center", va="center", transform=ax.transAxes)

    ax = axes[1]
    lr_rows = [r.get("lr") if isinstance(r.get("lr"), list) else [] for r in train]
    count = max((len(row) for row in lr_rows), default=0)
    labels = group_labels(run_dir, count)
    positive = dropped = False
    for i in range(count):
        # lr 0 (end of a linear decay, a frozen or gated group) cannot sit on a log axis: left out as a gap
        values = [row[i] if i < len(row) and row[i] > 0 else float("nan") for row in lr_rows]
        positive |= any(v == v for v in values)
        dropped |= any(v != v for v in values)
        # groups often share their lr (decay / no-decay twins): dash styles and widths keep every line visible
        ax.plot(steps, values, label=labels[i], linestyle=_STYLES[i % len(_STYLES)],
                linewidth=2.6 - 0.5 * (i % len(_STYLES)), **_marker(len(steps)))
    if positive:
        ax.set_yscale("log")
    ax.set(title="learning rate per parameter group", xlabel="optimizer step",
           ylabel="lr (log scale)" if positive else "lr")
    if dropped and positive:
        ax.text(0.01, 0.01, "lr 0 not drawn (log axis)", transform=ax.transAxes, fontsize=7, color="gray",
                va="bottom")
    ax.grid(alpha=0.3, which="both")
    if count:
        ax.legend(fontsize=7, loc="best", title="group", title_fontsize=7)

    if dev_lines:
        ax = axes[2]
        for label, xs, ys, style in dev_lines:
            ax.plot(xs, ys, label=label, **style)
        single = not any(label == "average" for label, *_ in dev_lines)
        ax.set(title="dev metrics" if single else "dev accuracy per task", xlabel="optimizer step",
               ylabel="dev score" if single else "dev accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")

    _integer_steps(axes)
    fig.suptitle(_run_title(run_dir, train), fontsize=10)
    fig.tight_layout()
    save_figure(fig, out)
    return out


def _integer_steps(axes) -> None:
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _run_title(run_dir: Path, train: list[dict]) -> str:
    name = run_dir.resolve().name
    if not train:
        return name
    last = train[-1]
    facts = [f"{last['step']} steps"]
    for key in ("engine", "zero_stage", "precision", "world_size"):
        if key in last:
            facts.append(f"{'ranks' if key == 'world_size' else key.replace('_', ' ')} {last[key]}")
    return f"{name} — " + " · ".join(facts)


def save_figure(fig, out: Path, svg: bool = False) -> None:
    """Written under a temporary name and renamed: a reader (or a kill) never sees half a PNG. svg: an SVG beside,
    byte-identical for the same figure (no date, fixed id salt), so redrawn results do not churn in git."""
    import matplotlib
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, fmt in [(out, "png")] + ([(out.with_suffix(".svg"), "svg")] if svg else []):
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with matplotlib.rc_context({"svg.hashsalt": "bert-recipe"}):
                fig.savefig(tmp, dpi=DPI, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def plot_results_table(table: dict, columns: list, out: Path, title: str, sd: Optional[dict] = None,
                       svg: bool = False, names: Optional[dict] = None) -> Path:
    """Recipe results as grouped bars: test error per task (groups) and stage (bars), error rates as fractions.
    `sd` (same shape as `table`): error bars — a grid's mean ± sd over seeds — instead of value labels. The
    paper's BERT-base number is a ★ wherever it has the task and stage (`paper.stage_error`). `names`: {task:
    metric} for tasks whose values are another metric than the error rate (micro-F1, Pearson; drawn × 100 and
    named under the task, without the paper's star)."""
    names = names or {}
    from .paper import stage_error
    fig, (ax,) = new_figure(1, (max(6.0, 1.6 * len(table) + 2), 4.2))
    width = 0.8 / max(1, len(columns))
    starred = False
    for k, col in enumerate(columns):
        xs = [i + (k - (len(columns) - 1) / 2) * width for i in range(len(table))]
        ys = [100 * row.get(col, float("nan")) for row in table.values()]
        if sd is None:
            ax.bar_label(ax.bar(xs, ys, width, label=col), fmt="%.1f", fontsize=7, padding=1)
        else:
            ax.bar(xs, ys, width, yerr=[100 * sd.get(t, {}).get(col, 0.0) for t in table], capsize=3, label=col)
        for x, task in zip(xs, table):
            ref = stage_error(task, col) if task not in names else None
            if ref is not None:
                ax.plot(x, ref, "k*", markersize=8, label=None if starred else "paper (BERT-base)")
                starred = True
    ax.set_xticks(range(len(table)), [f"{t}\n({names[t]} × 100)" if t in names else t for t in table])
    ax.set_ylabel("test error (%)" if not names else "test error (%), or the metric under the task")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out, svg=svg)
    return out


def run_labels(run_dirs: Sequence[Path]) -> list[str]:
    """Legend labels for overlaid runs: the dir name, or the path below their common parent where names repeat
    (a recipe's `fit/trec` and `pt_fit/trec`)."""
    names = [Path(d).resolve().name for d in run_dirs]
    if len(set(names)) == len(names):
        return names
    resolved = [str(Path(d).resolve()) for d in run_dirs]
    common = os.path.commonpath(resolved)
    return [os.path.relpath(r, common) if r != common else Path(r).name for r in resolved]


def plot_overlay(run_dirs: Sequence[Path], out: Path) -> Path:
    """Several runs in one figure: training loss, and dev accuracy (a multi-task run's average) where runs have
    it, one line per run labelled by its dir name."""
    runs = []
    for d in run_dirs:
        metrics = Path(d) / "metrics.jsonl"
        if not metrics.is_file():
            raise UserError(f"{d} has no metrics.jsonl (not a training run's output dir?)")
        runs.append(split_records(read_metrics(metrics)))
    labels = run_labels(run_dirs)
    has_dev = any(dev for _, dev in runs)
    panels = 1 + has_dev
    fig, axes = new_figure(panels, (_PANEL[0] * panels + 0.6, _PANEL[1] + 0.3))
    from matplotlib import rcParams
    colors = rcParams["axes.prop_cycle"].by_key().get("color", [None])
    for i, ((train, dev), label) in enumerate(zip(runs, labels)):
        color = colors[i % len(colors)]
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label=label, color=color,
                     **_marker(len(train)))
        if has_dev:
            task = "average" if "average" in dev else next(iter(dev), None)
            key = _dev_score(dev.get(task, [])) or "accuracy"
            pts = [(r["step"], r[key]) for r in dev.get(task, []) if isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                axes[1].plot(xs, ys, label=label, color=color, marker="o", markersize=4)
    axes[0].set(title="training loss", xlabel="optimizer step", ylabel="loss")
    axes[0].grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    if has_dev:
        axes[1].set(title="dev score (accuracy · micro-F1 · Pearson; multi-task: average accuracy)",
                    xlabel="optimizer step", ylabel="dev score")
        axes[1].grid(alpha=0.3)
        axes[1].legend(fontsize=8, loc="best")
    _integer_steps(axes)
    fig.suptitle(f"{len(runs)} runs", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    save_figure(fig, out)
    return out


def write_curves(run_dir: Path) -> Optional[Path]:
    """`plot_run` for the end of a finished training run (main process): the path, or None after one warning in
    the job log — a missing matplotlib, a full disk or an odd metrics file must never fail a run whose model is
    already saved."""
    try:
        out = plot_run(run_dir)
    except Exception as exc:  # noqa: BLE001 — by design: a figure is never worth a failed run
        first = (str(exc).splitlines() or [""])[0]
        log.warning(f"curves: not drawn ({type(exc).__name__}: {first})")
        return None
    log.info(f"curves: {out}")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.plot", description="Redraw a run's curves.png, or overlay several runs.")
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="output dir(s) holding metrics.jsonl")
    parser.add_argument("--out", help=f"PNG to write (default: RUN_DIR/{CURVES} for one run, ./{OVERLAY} for "
                                      f"several)")
    args = parser.parse_args(argv)
    try:
        if len(args.run_dirs) == 1:
            out = plot_run(Path(args.run_dirs[0]), Path(args.out) if args.out else None)
        else:
            out = plot_overlay([Path(d) for d in args.run_dirs], Path(args.out or OVERLAY))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(out)  # the command's result (the file written), not a job-log line: stays a plain print
    return 0


if __name__ == "__main__":
    sys.exit(main())
