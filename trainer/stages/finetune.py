"""Fine-tuning for classification with the paper's strategies: truncation / hierarchy, layer choice and pooling,
layer-wise decayed learning rates, schedules, few-shot, frozen-feature baseline. Best-on-dev, test once.

With several `tasks` it is multi-task fine-tuning (MFiT): one shared encoder, a head per task; every optimizer
step draws one task — from (seed, step) only, so every rank runs the same head (under ZeRO-3 a rank running
another head would hang the collectives) and a resumed run draws the same sequence."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .. import loop, unpadded
from ..classifier import RECIPE_FILE, SINGLE, Classifier, plain_init
from ..config import ClassificationDataConfig, FinetuneConfig, TextConfig, to_dict
from ..distributed import make_accelerator, resolve_launch_settings
from ..errors import UserError
from ..flops import finetuning_flops_per_token
from ..metrics import classification_metrics
from ..model import _auto_config, instantiate, load_tokenizer, max_positions
from ..optim.layer_decay import layer_decay_scales
from ..optim.param_groups import build_param_groups, describe_groups, make_optimizer
from ..text import truncation
from ..text.batching import Collator, rank_eval_batches, rank_train_batches
from ..text.data import load_task
from .common import (check_output_dir, claim_output_dir, fp32_state_dict, resume_train_config,
                     save_resolved_config, validate_train_optim)


@dataclass
class Task:
    name: str
    data: ClassificationDataConfig
    text: TextConfig
    vocab: list = None
    splits: dict = None  # split → Examples (rows of the prepared, memory-mapped data)
    lengths: dict = None  # split → tokens per example after truncation (numpy)
    encoder: truncation.Encoder = None
    collate: Collator = None
    train_sums: tuple = ()  # (examples, chunks, tokens, Σ chunk length²) of train

    def batch(self, split: str, idx: np.ndarray) -> dict:
        examples = self.splits[split]
        return self.collate([self.encoder.encode_pieces(examples.pieces(j)) for j in idx], examples.labels[idx])


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


def build_model(cfg: FinetuneConfig, tokenizer, tasks: list[Task]) -> Classifier:
    """A fresh classifier on an encoder checkpoint (or random init), or — when `model.name_or_path` is a
    classifier this trainer exported (e.g. a task of a multi-task run) — that classifier, head included.

    Built whole on every rank (no ZeRO-3 partitioned construction): DeepSpeed partitions it in prepare()."""
    from transformers import AutoModel
    path = cfg.model.name_or_path
    torch.manual_seed(cfg.seed)  # new heads (and a random encoder) start the same whatever ran before in the process
    with plain_init():
        if path and (Path(path) / RECIPE_FILE).is_file():
            if len(tasks) != 1:
                raise UserError(f"{path} is a single-task classifier; multi-task runs start from an encoder")
            if cfg.model.config:
                raise UserError(f"model.config cannot be applied to {path}, a classifier exported by this trainer "
                                f"(its config is fixed); remove model.config")
            model, recipe = Classifier.from_pretrained(path)
            if [str(x) for x in recipe["labels"]] != [str(x) for x in tasks[0].vocab]:
                raise UserError(f"{path} was trained on labels {recipe['labels']}, this task has {tasks[0].vocab}")
            for key in ("layers", "layer_pool", "pooler"):
                if recipe["head"][key] != getattr(cfg.head, key):
                    raise UserError(f"head.{key}={getattr(cfg.head, key)!r} differs from the model in {path} "
                                    f"({recipe['head'][key]!r})")
            head = model.heads[SINGLE]
            head.text_cfg, head.hierarchical = tasks[0].text, tasks[0].text.strategy == "hierarchical"
            head.dropout.p = cfg.head.dropout
            if cfg.head.freeze_encoder:
                model.encoder.requires_grad_(False)
            return model
        conf = _auto_config(cfg.model, tokenizer)

        def make(attn):  # fp32 weights whatever the checkpoint's dtype: the engine casts for bf16/fp16 itself
            if path:
                return AutoModel.from_pretrained(path, config=conf, attn_implementation=attn, dtype=torch.float32)
            return AutoModel.from_config(conf, attn_implementation=attn, dtype=torch.float32)

        try:
            encoder = instantiate(make, cfg.model, conf.model_type)
        except OSError as exc:
            raise UserError(f"cannot load encoder '{path}': {str(exc).splitlines()[0]}") from None
    return Classifier(encoder, {t.name: (len(t.vocab), t.text) for t in tasks}, cfg.head)


def task_probabilities(tasks: list[Task], cfg: FinetuneConfig) -> np.ndarray:
    sizes = np.array([len(t.splits["train"]) for t in tasks], dtype=float)
    alpha = {"proportional": 1.0, "uniform": 0.0, "temperature": cfg.multitask.alpha}[cfg.multitask.sampling]
    weights = sizes ** alpha
    return weights / weights.sum()


def task_of_step(seed: int, step: int, probs: np.ndarray) -> int:
    """The task of optimizer step `step`: a function of (seed, step) only — identical on every rank."""
    return int(np.random.default_rng([seed, step, 99]).choice(len(probs), p=probs))


def run(cfg: FinetuneConfig, resume: bool = False, overwrite: bool = False, eval_only: bool = False) -> bool:
    """Train (or continue) one fine-tuning run. True when it finished, False when stopped early.

    eval_only: no training — evaluate `model.name_or_path` (a classifier exported by this trainer) or else the
    latest intact checkpoint in `output_dir` on dev / test, through the same engine and evaluation code as
    training, and write `<output_dir>/eval_results.json`."""
    cfg = resolve_launch_settings(cfg)
    validate(cfg)
    tasks = tasks_of(cfg)
    out = Path(cfg.output_dir)
    if eval_only:
        eval_from = _eval_only_source(cfg, out, overwrite)
    else:
        check_output_dir(out, to_dict(cfg), resume, overwrite)
        cfg = replace(cfg, train=resume_train_config(out, resume, cfg.train, cfg.distributed.deepspeed_config))
    accelerator, topo = make_accelerator(precision=cfg.model.precision, micro_batch=cfg.train.micro_batch_size,
                                         grad_accum=cfg.train.grad_accum, max_grad_norm=cfg.train.max_grad_norm,
                                         deepspeed_config=cfg.distributed.deepspeed_config,
                                         # DDP: heads of tasks not drawn, or layers above the one read, get no grad
                                         find_unused_parameters=(len(tasks) > 1 or cfg.head.layers != -1
                                                                 or not cfg.head.pooler))
    with accelerator.local_main_process_first():
        tokenizer = load_tokenizer(cfg.model, "grammar", _cache_dir())
    for t in tasks:
        truncation.validate(t.text, len(t.data.text_fields), 10**9)
        t.splits, t.vocab = load_task(t.data, cfg.seed, tokenizer, _cache_dir(), log=accelerator.print)
        t.encoder = truncation.Encoder(tokenizer, t.text)
        t.lengths = {}
        for name, ex in t.splits.items():  # tokens per example (length grouping); Σs for the FLOPs count
            tokens, chunks, squares = truncation.encoded_stats(ex.piece_lengths(), t.text)
            t.lengths[name] = tokens
            if name == "train":
                t.train_sums = (len(ex), int(chunks.sum()), int(tokens.sum()), int(squares.sum()))
        accelerator.print(f"{t.name if cfg.tasks else 'task'}: " +
                          " · ".join(f"{n} {len(e)}" for n, e in t.splits.items()) + f" · labels {t.vocab}")
    model = build_model(cfg, tokenizer, tasks)
    unpad = cfg.model.attn_implementation == "unpadded"
    if unpad:
        unpadded.check(model.encoder.config)
        model.encoder.set_attn_implementation(unpadded.register())
    for t in tasks:
        truncation.validate(t.text, len(t.data.text_fields), max_positions(model.encoder))
        t.collate = Collator(tokenizer.pad_token_id, t.text.strategy == "hierarchical", unpadded=unpad,
                             position_offset=unpadded.position_offset(model.encoder.config) if unpad else 0)
    if cfg.model.gradient_checkpointing:
        model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    samples_per_step = cfg.train.micro_batch_size * topo.world_size * cfg.train.grad_accum
    probs = task_probabilities(tasks, cfg)

    def batches(start: int):
        step = start // samples_per_step
        done = np.bincount([task_of_step(cfg.seed, s, probs) for s in range(step)] if len(tasks) > 1 else
                           np.zeros(step, dtype=int), minlength=len(tasks))
        streams = [rank_train_batches(t.lengths["train"], cfg.train.micro_batch_size, topo.world_size, topo.rank,
                                      cfg.seed + i, int(done[i]) * samples_per_step, cfg.train.grad_accum)
                   for i, t in enumerate(tasks)]
        trace = None
        if cfg.train.trace_samples:  # per rank: "step task example-indices" for every micro-batch
            (out / "samples").mkdir(exist_ok=True)
            trace = open(out / "samples" / f"rank{topo.rank}.txt", "a")
        while True:
            i = task_of_step(cfg.seed, step, probs) if len(tasks) > 1 else 0
            t = tasks[i]
            for _ in range(cfg.train.grad_accum):
                idx = next(streams[i])
                if trace:
                    trace.write(f"{step} {t.name} {' '.join(map(str, idx.tolist()))}\n")
                    trace.flush()
                yield {**t.batch("train", idx), "task": t.name}
            step += 1

    def predict(model, t: Task, split: str) -> np.ndarray:
        """Logits for every example of `split`, gathered from all ranks (each rank runs equal batch counts)."""
        chunks = []
        for idx, valid in rank_eval_batches(t.lengths[split], t.data.eval_batch_size, topo.world_size, topo.rank):
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in t.batch(split, idx).items()}
            _, logits = model(**batch, task=t.name)
            keep = torch.as_tensor(valid, device=accelerator.device)
            packed = torch.cat([torch.as_tensor(idx, device=accelerator.device).unsqueeze(1).float(),
                                keep.unsqueeze(1).float(), logits.float()], dim=1)
            chunks.append(accelerator.gather(packed).cpu())
        table = torch.cat(chunks)
        table = table[table[:, 1] > 0]
        logits = torch.empty((len(t.splits[split]), len(t.vocab)))
        logits[table[:, 0].long()] = table[:, 2:]
        return logits.numpy()

    def evaluate(model, split: str = "dev") -> dict:
        return {t.name: classification_metrics(predict(model, t, split).argmax(-1), t.splits[split].labels,
                                               len(t.vocab)) for t in tasks if split in t.splits}

    def write_results(acc, trained) -> None:
        trained.eval()
        splits = [s for s in ("dev", "test") if any(s in t.splits for t in tasks)]
        with torch.no_grad():  # each split once, all its tasks together
            by_split = {s: evaluate(trained, s) for s in splits}
        results = {t.name: {s: by_split[s][t.name] for s in splits if s in t.splits} for t in tasks}
        if acc.is_main_process:
            single = not cfg.tasks
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval_results.json").write_text(json.dumps(results[SINGLE] if single else results, indent=1))
            for t in tasks:
                for split, r in results[t.name].items():
                    acc.print(f"{'' if single else t.name + ' '}{split}: accuracy {r['accuracy']:.4f} · "
                              f"error {r['error_rate']:.4f} · macro-F1 {r['macro_f1']:.4f} ({r['n']} examples)")

    def export(acc, trained):
        write_results(acc, trained)
        state_dict = fp32_state_dict(acc, trained)
        if acc.is_main_process:
            single = not cfg.tasks
            for t in tasks:
                target = out / "hf_model" if single else out / "tasks" / t.name / "hf_model"
                _export_atomically(acc.unwrap_model(trained), target, state_dict, tokenizer, t)
        acc.wait_for_everyone()

    if cfg.optim.layer_decay < 1 and not cfg.head.freeze_encoder:
        scale, part = layer_decay_scales(model, model.encoder, cfg.optim.layer_decay)
    else:
        scale, part = None, layer_decay_scales(model, model.encoder, 1.0)[1]
    multi = len(tasks) > 1
    groups = build_param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, lr_scale=scale, part=part,
                                task_of=(lambda name: name.split(".")[1] if name.startswith("heads.") else None)
                                if multi else None)
    if not groups:
        raise UserError("no trainable parameters")
    if eval_only:
        return _evaluate_only(accelerator, topo, model, make_optimizer(groups, cfg.optim.betas, cfg.optim.eps),
                              eval_from, write_results, out)
    resume_from = claim_output_dir(accelerator, out, resume, overwrite)  # inputs are good: the run may start
    save_resolved_config(accelerator, out, to_dict(cfg))
    if accelerator.is_main_process:
        (out / "param_groups.json").write_text(json.dumps(describe_groups(groups), indent=1))
    optimizer = make_optimizer(groups, cfg.optim.betas, cfg.optim.eps)

    def loss(model, batch):
        return model(**batch)[0]

    fpt = finetuning_flops_per_token(model.encoder, *(sum(t.train_sums[k] for t in tasks) for k in range(4)),
                                     max(len(t.vocab) for t in tasks), train_encoder=not cfg.head.freeze_encoder)

    def lr_gate(step: int) -> list:
        """Heads of the tasks not drawn for `step` get lr 0 in it: their zero gradients would otherwise still
        move them through weight decay and Adam's momentum (ZeRO steps every parameter of its partition)."""
        drawn = tasks[task_of_step(cfg.seed, step, probs)].name
        return [1.0 if g["task"] in (None, drawn) else 0.0 for g in groups]

    job = loop.Job(model=model, optimizer=optimizer, batches=batches, loss=loss,
                   samples_per_epoch=sum(len(t.splits["train"]) for t in tasks), export=export,
                   evaluate=evaluate, flops_per_token=fpt, lr_gate=lr_gate if multi else None)
    loop_cfg = loop.LoopConfig(out, cfg.seed, cfg.train, cfg.optim, cfg.wandb, to_dict(cfg))
    finished = loop.run(job, loop_cfg, accelerator, topo, resume_from)
    if finished:
        where = out / "hf_model" if not cfg.tasks else out / "tasks" / "<task>" / "hf_model"
        accelerator.print(f"eval results: {out / 'eval_results.json'}\nmodel: {where}")
    return finished


def _eval_only_source(cfg: FinetuneConfig, out: Path, overwrite: bool):
    """What --eval-only evaluates: None (the exported classifier in model.name_or_path, loaded as a start model
    is) or the latest intact checkpoint of the run in output_dir. Refuses to replace eval_results.json."""
    from .. import checkpoint
    if (out / "eval_results.json").exists() and not overwrite:
        raise UserError(f"{out / 'eval_results.json'} exists; pass --overwrite to replace it")
    path = cfg.model.name_or_path
    if path and (Path(path) / RECIPE_FILE).is_file():
        return None
    found = checkpoint.latest_complete(out, log=lambda *_: None, verify=True) if out.is_dir() else None
    if found is None:
        raise UserError(f"--eval-only needs a model: model.name_or_path set to an exported classifier "
                        f"(<run>/hf_model), or output_dir set to a run with an intact checkpoint ({out} has none)")
    return found


def _evaluate_only(accelerator, topo, model, optimizer, checkpoint_path, write_results, out: Path) -> bool:
    from .. import checkpoint
    model, optimizer = accelerator.prepare(model, optimizer)  # the engine the run would use (ZeRO-3 shards it)
    if checkpoint_path is not None:
        state = checkpoint.load(accelerator, model, optimizer, checkpoint_path,
                                topo.zero_stage if topo.deepspeed else None)
        accelerator.print(f"evaluating {checkpoint_path} (step {state.step})")
    write_results(accelerator, model)
    accelerator.wait_for_everyone()
    accelerator.print(f"eval results: {out / 'eval_results.json'}")
    return True


def _cache_dir():
    from ..corpus.prepare import default_cache_dir
    return default_cache_dir()


def _export_atomically(model: Classifier, target: Path, state_dict: dict, tokenizer, task: Task) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    model.save(tmp, state_dict, tokenizer, task.vocab, task.data.text_fields, task=task.name,
               label_field=task.data.label_field)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
