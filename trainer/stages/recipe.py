"""The paper's whole pipeline in one command (Tables 5-7), each stage switchable under `stages`:

    FiT (each task from the start model) → further pre-training (ITPT / IDPT / CDPT) → ITPT-FiT (each task from
    the further pre-trained model) → ITPT-MFiT (all tasks, one shared encoder) → ITPT-MFiT-FiT (each task again
    from its MFiT model, at a lower lr)

Every stage is an ordinary pre-training or fine-tuning run in its own subdir (fit/, pretrain/, pt_fit/, mfit/,
mfit_fit/), started with --resume semantics: a finished stage (marked by `stage.json`) is skipped, an interrupted
one continues from its last checkpoint. The recipe ends with `results.json` / `results.md` (test error per task
per stage, the paper's numbers beside them) and `results.png` (the same as grouped bars)."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import yaml

from .. import problems
from ..config import FinetuneConfig, PretrainConfig, RecipeConfig, build, to_dict
from ..distributed import init_processes, reset_between_stages, resolve_launch_settings, uses_deepspeed
from ..errors import UserError
from . import finetune, pretrain
from .common import first_difference

log = logging.getLogger(__name__)

METRIC_NAMES = {"error_rate": "error", "micro_f1": "micro-F1", "pearson": "Pearson"}

DONE = "stage.json"
STAGE_DIRS = ("fit", "pretrain", "pt_fit", "mfit", "mfit_fit")


@dataclass
class Stage:
    label: str  # the column in the results table, e.g. "ITPT-MFiT-FiT"
    out: Path
    config: object
    runner: Callable
    task: Optional[str] = None  # single-task stages


def _model(cfg: RecipeConfig, name_or_path: Optional[str]) -> dict:
    model = asdict(cfg.model)
    if name_or_path:
        model.update(name_or_path=str(name_or_path), config=None)
        model["tokenizer"] = None  # the exported model dir carries its tokenizer
    return model


def _card(cfg: RecipeConfig, out: Path) -> dict:
    """A stage's card settings: the recipe's, its `model_name` (when set) made the stage's own — every stage
    exports a model, and one name for all would make their uploads overwrite each other."""
    card = asdict(cfg.card)
    if card["model_name"]:
        card["model_name"] += "-" + "-".join(out.relative_to(cfg.output_dir).parts)
    return card


def _finetune_config(cfg: RecipeConfig, out: Path, model: dict, tasks: list, lr_scale: float = 1.0):
    ft = asdict(cfg.finetune)
    ft["optim"]["lr"] *= lr_scale
    base = {"output_dir": str(out), "seed": cfg.seed, "model": model, "head": ft["head"], "train": ft["train"],
            "optim": ft["optim"], "eval": ft["eval"], "wandb": {**asdict(cfg.wandb), "name": f"{cfg.wandb.name or 'recipe'}/{out.name}"},
            "card": _card(cfg, out), "distributed": asdict(cfg.distributed)}
    if len(tasks) == 1:
        base.update(data=asdict(tasks[0].data), text=asdict(tasks[0].text))
    else:
        base.update(tasks=[asdict(t) for t in tasks], multitask=ft["multitask"])
    return build(FinetuneConfig, base)


def plan(cfg: RecipeConfig) -> list[Stage]:
    if not cfg.tasks:
        raise UserError("the recipe needs at least one task under `tasks`")
    out, st = Path(cfg.output_dir), cfg.stages
    names = [t.name for t in cfg.tasks]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise UserError(f"recipe tasks need distinct names; got {names}")
    stages: list[Stage] = []
    base = cfg.model.name_or_path
    if st.fit_baseline:
        for t in cfg.tasks:
            stages.append(Stage("FiT", out / "fit" / t.name,
                                _finetune_config(cfg, out / "fit" / t.name, _model(cfg, base), [t]), finetune.run,
                                t.name))
    start, prefix = base, ""
    if st.further_pretrain and cfg.pretrain.data.corpora:
        pt_out = out / "pretrain"
        pt = build(PretrainConfig, {"output_dir": str(pt_out), "seed": cfg.seed, "model": asdict(cfg.model),
                                    "data": asdict(cfg.pretrain.data), "train": asdict(cfg.pretrain.train),
                                    "optim": asdict(cfg.pretrain.optim),
                                    "wandb": {**asdict(cfg.wandb), "name": f"{cfg.wandb.name or 'recipe'}/pretrain"},
                                    "card": _card(cfg, pt_out), "distributed": asdict(cfg.distributed)})
        stages.append(Stage("pretrain", pt_out, pt, pretrain.run))
        start, prefix = pt_out / "hf_model", f"{st.pretrain_label}-"
        if st.fit_after_pretrain:
            for t in cfg.tasks:
                d = out / "pt_fit" / t.name
                stages.append(Stage(f"{prefix}FiT", d, _finetune_config(cfg, d, _model(cfg, start), [t]),
                                    finetune.run, t.name))
    if st.multitask:
        if len(cfg.tasks) < 2:
            raise UserError("stages.multitask needs at least two tasks")
        d = out / "mfit"
        stages.append(Stage(f"{prefix}MFiT", d, _finetune_config(cfg, d, _model(cfg, start), cfg.tasks),
                            finetune.run))
        if st.fit_after_multitask:
            for t in cfg.tasks:
                e = out / "mfit_fit" / t.name
                stages.append(Stage(f"{prefix}MFiT-FiT", e,
                                    _finetune_config(cfg, e, _model(cfg, d / "tasks" / t.name / "hf_model"), [t],
                                                     lr_scale=st.lr_scale_after_multitask),
                                    finetune.run, t.name))
    return stages


def _check_same_stage(stage: Stage) -> None:
    """A finished stage is reused only if it was run with this stage's model, data and tasks."""
    saved = yaml.safe_load((stage.out / "config.yaml").read_text()) or {}
    planned = to_dict(resolve_launch_settings(stage.config, quiet=True))  # as the stage saved it
    for section in ("model", "data", "tasks", "text", "head"):
        key = first_difference(saved.get(section), planned.get(section), section + ".")
        if key:
            raise UserError(f"{stage.out} holds a finished stage whose config key '{key}' differs from this recipe's; "
                            f"use another output_dir or --overwrite")


def _test_results(stage: Stage) -> dict:
    """{task: (metric, test value)} of a finished fine-tuning stage — the error rate of a single-label task (the
    paper's), micro-F1 or Pearson of the other kinds (problems.headline) — empty for pre-training or without a
    test split."""
    path = stage.out / "eval_results.json"
    if stage.runner is pretrain.run or not path.is_file():
        return {}
    results = json.loads(path.read_text())
    per_task = {stage.task: results} if stage.task else results
    kinds = {t.name: t.data.problem_type for t in (stage.config.tasks or [])}
    kind_of = (lambda task: stage.config.data.problem_type) if stage.task else kinds.get
    return {task: problems.headline(kind_of(task), r["test"]) for task, r in per_task.items() if "test" in r}


def run(cfg: RecipeConfig, overwrite: bool = False) -> bool:
    """Run every unfinished stage; True when all are done and the table is written."""
    import torch.distributed as dist
    stages = plan(cfg)
    out = Path(cfg.output_dir)
    state = init_processes(uses_deepspeed(cfg.distributed.deepspeed_config))
    if overwrite:
        if state.is_main_process:
            for name in (*STAGE_DIRS, "results.json", "results.md", "results.png"):
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        state.wait_for_everyone()
    for i, stage in enumerate(stages, 1):
        where = f"[{i}/{len(stages)}] {stage.label}{' · ' + stage.task if stage.task else ''} → {stage.out}"
        if (stage.out / DONE).is_file():
            _check_same_stage(stage)
            log.info(f"{where}: done, skipped")
            continue
        log.info(where)
        name = cfg.stages.pretrain_label if stage.runner is pretrain.run else stage.label.split("-")[-1]
        finished = stage.runner(stage.config, resume=True, stage_name=name)
        reset_between_stages()
        if not finished:
            log.info(f"{where}: stopped before the end; run the recipe again to continue it")
            return False
        if not dist.is_initialized() or dist.get_rank() == 0:
            (stage.out / DONE).write_text(json.dumps({"label": stage.label, "task": stage.task,
                                                      "test": _test_results(stage)}, indent=1))
        if dist.is_initialized():
            dist.barrier()
    table = {t.name: {} for t in cfg.tasks}
    for stage in stages:
        for task, (_, value) in _test_results(stage).items():
            table[task][stage.label] = value
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_results(out, table, [s.label for s in stages if s.runner is not pretrain.run],
                      random_init=not cfg.model.name_or_path,
                      metrics={t.name: problems.DEFAULT_METRIC[t.data.problem_type] for t in cfg.tasks})
        log.info("\n" + (out / "results.md").read_text() + f"figure: {out / 'results.png'}")
    return True


def write_results(out: Path, table: dict, labels: list, random_init: bool = False, metrics: dict = None) -> None:
    """results.json ({task: {stage: test value}}), results.md and results.png. `metrics`: {task: the metric its
    values are} — error_rate (the paper's, and the default), micro_f1 or pearson; a row of another metric names
    it, and a Pearson row is not a percentage."""
    columns = list(dict.fromkeys(labels))
    metrics = {task: (metrics or {}).get(task, "error_rate") for task in table}
    (out / "results.json").write_text(json.dumps(table, indent=1))
    if set(metrics.values()) == {"error_rate"}:
        title = "Test error rate (%) per task and stage"
    else:
        title = "Test results per task and stage: error rate (%) unless the row names micro-F1 (%) or Pearson's r"
    lines = [title, "", "| task | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    from ..paper import stage_cells
    for task, row in table.items():
        scale = 1 if metrics[task] == "pearson" else 100
        cells = [f"{scale * row[c]:.{4 if scale == 1 else 2}f}" if c in row else "–" for c in columns]
        name = task if metrics[task] == "error_rate" else f"{task} ({METRIC_NAMES[metrics[task]]})"
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        ref = stage_cells(task, columns)
        if ref:
            lines.append("| " + " | ".join(ref) + " |")
    if columns and columns[0] in ("FiT", "Feat-FiT"):
        lines += ["", "FiT starts from the configured model as it is"
                  + (" (here a randomly initialised encoder: the baseline without any pre-training)"
                     if random_init else "") + "; each later column adds the stage in its name."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    from ..plot import plot_results_table
    plot_results_table(table, columns, out / "results.png", title.split(":")[0].replace(" rate (%)", ""),
                       names={task: METRIC_NAMES[m] for task, m in metrics.items() if m != "error_rate"})
