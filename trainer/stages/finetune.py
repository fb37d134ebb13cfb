"""Fine-tuning for classification with the paper's strategies: truncation / hierarchy, layer choice and pooling,
layer-wise decayed learning rates, schedules, few-shot, frozen-feature baseline. Best-on-dev, test once.

With several `tasks` it is multi-task fine-tuning (MFiT, trainer/multitask.py): one shared encoder, a head per
task, one task drawn per optimizer step. `run` reads as the recipe does: the tasks' data, the classifier on the
encoder, the layer-wise decayed parameter groups, the sampler and the evaluator, the loop."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import loop, micro_batch, model_card, problems, unpadded
from ..classifier import RECIPE_FILE, SINGLE, Classifier, HeadSpec, plain_init
from ..config import ClassificationDataConfig, FinetuneConfig, TextConfig, to_dict
from ..errors import UserError
from ..evaluate import Evaluator
from ..flops import finetuning_flops_per_token
from ..model import build_model, load_tokenizer, max_positions
from ..multitask import TaskSampler
from ..optim.layer_decay import layer_decay_scales
from ..optim.param_groups import build_param_groups, make_optimizer
from ..text import truncation
from ..text.batching import Collator
from ..text.tasks import load_task
from .common import Run, fp32_state_dict, open_run, train, validate_train_optim, write_export

log = logging.getLogger(__name__)


@dataclass
class Task:
    """One classification task of the run: its config, and once loaded its labels and prepared splits."""
    name: str
    data: ClassificationDataConfig
    text: TextConfig
    vocab: list = None
    splits: dict = None  # split → Examples (rows of the prepared, memory-mapped data)
    lengths: dict = None  # split → tokens per example after truncation (numpy)
    encoder: truncation.Encoder = None
    collate: Collator = None
    train_sums: tuple = ()  # (examples, chunks, tokens, Σ chunk length²) of train
    spec: HeadSpec = None  # what its head predicts and how it is trained (shared with the model's head)

    @property
    def problem(self) -> str:
        return self.data.problem_type

    def batch(self, split: str, idx: np.ndarray, labels: bool = True) -> dict:
        examples = self.splits[split]
        return self.collate([self.encoder.encode_pieces(examples.pieces(j)) for j in idx],
                            examples.labels[idx] if labels else None)


def tasks_of(cfg: FinetuneConfig) -> list[Task]:
    if not cfg.tasks:
        return [Task(SINGLE, cfg.data, cfg.text)]
    if cfg.data.train:
        raise UserError("set either data (one task) or tasks (multi-task), not both")
    names = [t.name for t in cfg.tasks]
    if any(not n or not n.replace("_", "").replace("-", "").isalnum() for n in names) or len(set(names)) != len(names):
        raise UserError(f"tasks need distinct names of letters, digits, - and _; got {names}")
    return [Task(t.name, t.data, t.text) for t in cfg.tasks]


def validate(cfg: FinetuneConfig) -> None:
    validate_train_optim(cfg.train, cfg.optim)
    if not 0 < cfg.optim.layer_decay <= 1:
        raise UserError(f"optim.layer_decay (ξ) must be in (0, 1], got {cfg.optim.layer_decay}")
    if not 0 <= cfg.head.dropout < 1:
        raise UserError(f"head.dropout must be in [0, 1), got {cfg.head.dropout}")
    if cfg.multitask.sampling == "temperature" and not 0 <= cfg.multitask.alpha <= 1:
        raise UserError(f"multitask.alpha must be in [0, 1], got {cfg.multitask.alpha}")
    if cfg.eval.early_stopping_patience < 0 or cfg.eval.early_stopping_min_delta < 0:
        raise UserError("eval.early_stopping_patience and eval.early_stopping_min_delta must be >= 0")
    tasks = tasks_of(cfg)
    problems.selection_metrics([t.problem for t in tasks], cfg.eval.select_metric)
    for t in tasks:
        check_problem_settings(t.data, f"tasks[{t.name}].data." if cfg.tasks else "data.")


def check_problem_settings(data: ClassificationDataConfig, key: str) -> None:
    """Settings of one problem type given to another would be ignored: refused, naming the right one."""
    kind = data.problem_type
    if data.class_weights is not None and kind != problems.SINGLE:
        raise UserError(f"{key}class_weights is for single_label tasks; a {kind} task "
                        + ("takes data.pos_weight" if kind == problems.MULTI else "has no classes to weight"))
    if data.pos_weight is not None and kind != problems.MULTI:
        raise UserError(f"{key}pos_weight is for multi_label tasks"
                        + ("; a single_label task takes data.class_weights" if kind == problems.SINGLE else ""))
    if kind != problems.MULTI and (data.threshold != 0.5 or data.tune_thresholds):
        raise UserError(f"{key}threshold and {key}tune_thresholds are for multi_label tasks (this one is {kind})")
    if not 0 < data.threshold < 1:
        raise UserError(f"{key}threshold must be in (0, 1), got {data.threshold}")


def load_tasks(tasks: list[Task], tokenizer, seed: int, multi: bool) -> None:
    """Each task's labels and prepared splits (tokenized once into the cache), with the tokens per example
    after truncation (length grouping) and the sums the FLOPs count needs."""
    for t in tasks:
        truncation.validate(t.text, len(t.data.text_fields), 10**9)
        t.splits, t.vocab = load_task(t.data, seed, tokenizer, default_cache_dir())
        t.encoder = truncation.Encoder(tokenizer, t.text)
        t.lengths = {}
        for name, ex in t.splits.items():
            tokens, chunks, squares = truncation.encoded_stats(ex.piece_lengths(), t.text)
            t.lengths[name] = tokens
            if name == "train":
                t.train_sums = (len(ex), int(chunks.sum()), int(tokens.sum()), int(squares.sum()))
        t.spec = head_spec(t)
        log.info(f"{t.name if multi else 'task'}: " + " · ".join(f"{n} {len(e)}" for n, e in t.splits.items())
                 + f" · {t.problem} · {'target' if t.problem == problems.REGRESSION else 'labels'} {t.vocab}"
                 + _loss_note(t))


def head_spec(t: Task) -> HeadSpec:
    """The head a task's data asks for: its width, loss weights, the standardization of a regression target
    (mean and standard deviation of train), the thresholds of a multi-label one."""
    y, kind = t.splits["train"].labels, t.problem
    setting, key = ((t.data.class_weights, "data.class_weights") if kind == problems.SINGLE
                    else (t.data.pos_weight, "data.pos_weight"))
    weights = problems.loss_weights(kind, setting, y, t.vocab, key)
    mean, std = 0.0, 1.0
    if kind == problems.REGRESSION:
        mean, std = float(np.mean(y, dtype=np.float64)), float(np.std(y, dtype=np.float64))
        if std == 0:
            raise UserError(f"{t.data.train}: every training target is {mean:g}; there is nothing to regress")
    return HeadSpec(problems.num_outputs(kind, t.vocab), t.text, kind,
                    None if weights is None else weights.tolist(), mean, std,
                    [t.data.threshold] * len(t.vocab) if kind == problems.MULTI else None)


def _loss_note(t: Task) -> str:
    if t.problem == problems.REGRESSION:
        return f" · MSE on targets standardized with train's mean {t.spec.target_mean:.4g}, std {t.spec.target_std:.4g}"
    if t.spec.loss_weights is None:
        return ""
    what = "class weights" if t.problem == problems.SINGLE else "BCE pos_weight"
    return f" · {what} " + ", ".join(f"{lab}={w:.3g}" for lab, w in zip(t.vocab, t.spec.loss_weights))


def build_classifier(cfg: FinetuneConfig, tokenizer, tasks: list[Task]) -> Classifier:
    """A fresh classifier on an encoder checkpoint (or random init), or — when `model.name_or_path` is a
    classifier this trainer exported (e.g. a task of a multi-task run) — that classifier, head included. The
    encoder comes from the one model loader (`model.build_model`); new heads are seeded by `seed` like it."""
    path = cfg.model.name_or_path
    if not (path and (Path(path) / RECIPE_FILE).is_file()):
        encoder = build_model(cfg.model, tokenizer, head="encoder", seed=cfg.seed)
        return Classifier(encoder, {t.name: t.spec for t in tasks}, cfg.head)
    if len(tasks) != 1:
        raise UserError(f"{path} is a single-task classifier; multi-task runs start from an encoder")
    if cfg.model.config:
        raise UserError(f"model.config cannot be applied to {path}, a classifier exported by this trainer "
                        f"(its config is fixed); remove model.config")
    torch.manual_seed(cfg.seed)
    with plain_init():
        model, recipe = Classifier.from_pretrained(path)
    task = tasks[0]
    if recipe["problem_type"] != task.problem:
        raise UserError(f"{path} is a {recipe['problem_type']} model; this task has data.problem_type={task.problem}")
    if [str(x) for x in recipe["labels"]] != [str(x) for x in task.vocab]:
        raise UserError(f"{path} was trained on labels {recipe['labels']}, this task has {task.vocab}")
    for key in ("layers", "layer_pool", "pooler"):
        if recipe["head"][key] != getattr(cfg.head, key):
            raise UserError(f"head.{key}={getattr(cfg.head, key)!r} differs from the model in {path} "
                            f"({recipe['head'][key]!r})")
    head = model.heads[SINGLE]
    head.text_cfg, head.hierarchical = task.text, task.text.strategy == "hierarchical"
    head.dropout.p = cfg.head.dropout
    # this run's loss settings and thresholds; a regression head keeps the target scale it was trained in
    head.spec.text, head.spec.loss_weights, head.spec.thresholds = task.text, task.spec.loss_weights, task.spec.thresholds
    task.spec = head.spec
    if cfg.head.freeze_encoder:
        model.encoder.requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def attach_collators(model: Classifier, tasks: list[Task], cfg: FinetuneConfig, tokenizer) -> None:
    """Each task's batch builder, once the model is known: its position limit bounds the text, and
    `model.attn_implementation=unpadded` packs a batch into one row (trainer/unpadded.py)."""
    unpad = cfg.model.attn_implementation == "unpadded"
    if unpad:
        unpadded.check(model.encoder.config)
        model.encoder.set_attn_implementation(unpadded.register())
    for t in tasks:
        truncation.validate(t.text, len(t.data.text_fields), max_positions(model.encoder))
        t.collate = Collator(tokenizer.pad_token_id, t.text.strategy == "hierarchical", unpadded=unpad,
                             position_offset=unpadded.position_offset(model.encoder.config) if unpad else 0)


def longest_batches(tasks: list[Task], m: int) -> list[dict]:
    """Each task's m longest training examples (tokens after truncation) as one micro-batch: the largest
    batches the run will see, for the micro-batch probe."""
    return [{**t.batch("train", np.argsort(-t.lengths["train"], kind="stable")[:m]), "task": t.name} for t in tasks]


def param_groups(model: Classifier, cfg: FinetuneConfig, multi: bool) -> list:
    """AdamW groups with the paper's layer-wise decayed lrs (ξ per depth, optim/layer_decay.py); in a
    multi-task run each head's parameters are groups of their own, so idle heads can be held still."""
    if cfg.optim.layer_decay < 1 and not cfg.head.freeze_encoder:
        scale, part = layer_decay_scales(model, model.encoder, cfg.optim.layer_decay)
    else:
        scale, part = None, layer_decay_scales(model, model.encoder, 1.0)[1]
    groups = build_param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, lr_scale=scale, part=part,
                                task_of=(lambda name: name.split(".")[1] if name.startswith("heads.") else None)
                                if multi else None)
    if not groups:
        raise UserError("no trainable parameters")
    return groups


def run(cfg: FinetuneConfig, resume: bool = False, overwrite: bool = False, eval_only: bool = False,
        stage_name: Optional[str] = None) -> bool:
    """Train (or continue) one fine-tuning run. True when it finished, False when stopped early.

    stage_name: what the model card's lineage calls this stage (the recipe's FiT / MFiT; default by run type).

    eval_only: no training — evaluate `model.name_or_path` (a classifier exported by this trainer) or else the
    latest intact checkpoint in `output_dir` on dev / test, through the same engine and evaluation code as
    training, and write `<output_dir>/eval_results.json`."""
    tasks = tasks_of(cfg)
    multi = bool(cfg.tasks)
    eval_from = _eval_only_source(cfg, overwrite) if eval_only else None
    # DDP: heads of tasks not drawn, or layers above the one read, get no gradient
    run = open_run(cfg, validate, resume, overwrite, check_dir=not eval_only,
                   find_unused_parameters=len(tasks) > 1 or cfg.head.layers != -1 or not cfg.head.pooler)
    cfg, accelerator, topo = run.cfg, run.accelerator, run.topo
    with accelerator.local_main_process_first():
        tokenizer = load_tokenizer(cfg.model, "grammar", default_cache_dir())
    load_tasks(tasks, tokenizer, cfg.seed, multi)

    def build():  # the classifier on the encoder, the layer-wise decayed groups, the optimizer
        model = build_classifier(cfg, tokenizer, tasks)
        attach_collators(model, tasks, cfg, tokenizer)
        groups = param_groups(model, cfg, multi)
        return model, groups, make_optimizer(groups, cfg.optim.betas, cfg.optim.eps)

    if run.auto_micro_batch and not eval_only:  # the largest micro-batch that fits (trainer/micro_batch.py)
        run = micro_batch.probe(run, lambda: build()[::2], lambda m: longest_batches(tasks, m))
        cfg, accelerator, topo = run.cfg, run.accelerator, run.topo
    model, groups, optimizer = build()
    evaluate = Evaluator(tasks, accelerator, topo, cfg.eval.select_metric)
    results = run.out / "eval_results.json"
    if eval_only:
        return _evaluate_only(run, model, optimizer, eval_from, evaluate, results, single=not multi)

    sampler = TaskSampler(tasks, cfg.seed, cfg.multitask, cfg.train, topo.world_size, topo.rank,
                          trace_dir=run.out / "samples" if cfg.train.trace_samples else None)

    def export(acc, model, trained):  # the best-on-dev model: test evaluated once, then one HF model per task
        evaluate.write_results(model, results, single=not multi)
        state_dict = fp32_state_dict(acc, model)
        if acc.is_main_process:
            found = json.loads(results.read_text())
            names = [t.name for t in tasks] if multi else [None]
            record = model_card.stage_record(
                stage_name or ("MFiT" if multi else "FiT"), to_dict(cfg), trained, job.samples_per_epoch,
                found if multi else {SINGLE: found}, dict(zip(names, evaluate.select)))
            for t, name in zip(tasks, names):
                target = run.out / "tasks" / t.name / "hf_model" if multi else run.out / "hf_model"
                write_export(target, lambda d, t=t: acc.unwrap_model(model).save(
                    d, state_dict, tokenizer, t.vocab, t.data.text_fields, task=t.name, label_field=t.data.label_field,
                    label_separator=t.data.label_separator),
                    lambda d, name=name, target=target: model_card.write(d, record, to_dict(cfg.card), name,
                                                                        final=target))
        acc.wait_for_everyone()

    fpt = finetuning_flops_per_token(model.encoder, *(sum(t.train_sums[k] for t in tasks) for k in range(4)),
                                     max(t.spec.num_outputs for t in tasks), train_encoder=not cfg.head.freeze_encoder)
    job = loop.Job(model=model, optimizer=optimizer, batches=sampler.batches, loss=lambda m, b: m(**b)[0],
                   samples_per_epoch=sum(len(t.splits["train"]) for t in tasks), export=export,
                   evaluate=evaluate, select=evaluate.shortfall, early_stopping=cfg.eval,
                   flops_per_token=fpt, lr_gate=sampler.lr_gate(groups))
    finished = train(run, job, groups)
    if finished:
        where = run.out / "tasks" / "<task>" / "hf_model" if multi else run.out / "hf_model"
        log.info(f"eval results: {results}")
        log.info(f"model: {where}")
    return finished


def _eval_only_source(cfg: FinetuneConfig, overwrite: bool):
    """What --eval-only evaluates: None (the exported classifier in model.name_or_path, loaded as a start model
    is) or the latest intact checkpoint of the run in output_dir. Refuses to replace eval_results.json."""
    from .. import checkpoint
    out = Path(cfg.output_dir)
    if (out / "eval_results.json").exists() and not overwrite:
        raise UserError(f"{out / 'eval_results.json'} exists; pass --overwrite to replace it")
    path = cfg.model.name_or_path
    if path and (Path(path) / RECIPE_FILE).is_file():
        return None
    found = checkpoint.latest_complete(out, verify=True, quiet=True) if out.is_dir() else None
    if found is None:
        raise UserError(f"--eval-only needs a model: model.name_or_path set to an exported classifier "
                        f"(<run>/hf_model), or output_dir set to a run with an intact checkpoint ({out} has none)")
    return found


def _evaluate_only(run: Run, model, optimizer, checkpoint_path, evaluate: Evaluator, results: Path,
                   single: bool) -> bool:
    from .. import reshard
    accelerator, topo = run.accelerator, run.topo
    model, optimizer = accelerator.prepare(model, optimizer)  # the engine the run would use (ZeRO-3 shards it)
    if checkpoint_path is not None:
        state = reshard.load(accelerator, model, optimizer, checkpoint_path,
                             topo.zero_stage if topo.deepspeed else None)
        log.info(f"evaluating {checkpoint_path} (step {state.step})")
    evaluate.write_results(model, results, single)
    accelerator.wait_for_everyone()
    log.info(f"eval results: {results}")
    return True


def default_cache_dir():
    from ..data.cache import default_cache_dir as cache_dir
    return cache_dir()
