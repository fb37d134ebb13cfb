"""Further pre-training (ITPT / IDPT / CDPT — the same job pointed at different text): masked LM (+ optional NSP)."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import torch

from .. import loop, model_card
from ..config import PretrainConfig, to_dict
from ..corpus.masking import MLMCollator
from ..corpus.prepare import prepare_corpus
from ..corpus.reader import GlobalOrder, PackedDataset, RankBatches
from ..data.builtin import BUILTIN_PREFIX
from ..data.cache import default_cache_dir
from ..errors import UserError
from ..flops import pretraining_flops_per_token
from ..masked_head import use_masked_positions_only
from ..model import (build_model, dropped_pooler, head_parameter_names, load_tokenizer, max_positions,
                     missing_head_weights)
from ..optim.param_groups import build_param_groups, make_optimizer
from .common import export_hf, open_run, train, validate_train_optim

log = logging.getLogger(__name__)


def _builtin_name(cfg: PretrainConfig):
    for src in cfg.data.corpora:
        paths = src.path if isinstance(src.path, list) else [src.path]
        for p in paths:
            if isinstance(p, str) and p.startswith(BUILTIN_PREFIX):
                return p[len(BUILTIN_PREFIX):]
    return None


def validate(cfg: PretrainConfig) -> None:
    if cfg.model.attn_implementation == "unpadded":
        raise UserError("model.attn_implementation=unpadded is for fine-tuning: pre-training rows are packed full, "
                        "there is no padding to skip")
    if not cfg.data.corpora:
        raise UserError("data.corpora is empty: name at least one corpus (file, glob, hub dataset or builtin:grammar)")
    if cfg.data.seq_len < 8:
        raise UserError(f"data.seq_len must be >= 8, got {cfg.data.seq_len}")
    if not 0 < cfg.data.mlm_probability < 1:
        raise UserError(f"data.mlm_probability must be in (0, 1), got {cfg.data.mlm_probability}")
    for i, src in enumerate(cfg.data.corpora):
        if src.weight < 0:
            raise UserError(f"data.corpora[{i}].weight must be >= 0, got {src.weight}")
    validate_train_optim(cfg.train, cfg.optim)
    if cfg.optim.layer_decay != 1:
        raise UserError("optim.layer_decay applies to fine-tuning; pre-training trains all layers at optim.lr")
    if cfg.train.head_warmup_steps < -1:
        raise UserError(f"train.head_warmup_steps must be -1 (auto), 0 (off) or a number of steps; "
                        f"got {cfg.train.head_warmup_steps}")
    if not cfg.train.head_warmup_lr > 0:
        raise UserError(f"train.head_warmup_lr must be > 0, got {cfg.train.head_warmup_lr}")


# train.head_warmup_steps=-1 (auto) on a checkpoint without MLM-head weights: this share of the run's steps, at
# least MIN (but at most half the run), at most MAX
HEAD_WARMUP_AUTO_FRACTION = 0.1
HEAD_WARMUP_AUTO_MIN = 100
HEAD_WARMUP_AUTO_MAX = 1000
HEAD = "head"  # the `task` of the head's parameter groups (param_groups.json) while a head warm-up is planned


def head_warmup_steps(setting: int, missing_head: list, total_steps: int) -> int:
    """How many first steps train the pre-training head alone. `setting` is `train.head_warmup_steps`: N ≥ 0 as
    given; -1 (auto) → ceil(10 % of the run), at least 100 (or half the run if shorter), at most 1000, when the
    starting checkpoint lacked head weights (`missing_head`), else 0. Why: a new, random head's first gradients
    are large and meaningless, and reaching the encoder they damage what the further pre-training is meant to
    adapt (issue 11: all-MiniLM-L6-v2 ships no MLM head and ITPT-FiT gained nothing); ~100 head-only steps at
    `train.head_warmup_lr` bring its MLM loss to where the head alone stops improving (measured on IMDb)."""
    if setting >= 0:
        return setting
    if not missing_head:
        return 0
    floor = min(HEAD_WARMUP_AUTO_MIN, total_steps // 2)
    return min(HEAD_WARMUP_AUTO_MAX, max(1, floor, math.ceil(HEAD_WARMUP_AUTO_FRACTION * total_steps)))


def head_warmup_gate(groups: list, warmup: int, total_steps: int, head_lr: float, why: str):
    """`loop.Job.lr_gate` for a head warm-up: while step < `warmup` (the lr in effect for steps 1…warmup) factor
    0 for the encoder's parameter groups and head_lr / the group's lr for the head's (train.head_warmup_lr), 1
    for every group afterwards; with `Job.schedule_start = warmup` the warm-up runs at constant lrs and optim's
    schedule (its own warm-up ramp included) starts when the encoder does. Logs one line when the warm-up starts
    (or is resumed) and one when it ends. A pure function of the step, so a resumed run repeats it exactly.

    The encoder is frozen through its lr, not `requires_grad`: DeepSpeed ZeRO-2/3 builds its flat partitions once
    in `prepare()` and cannot drop or add parameters afterwards, so every parameter stays in the optimizer and the
    one schedule keeps driving all groups. With lr 0, AdamW does not move a weight at all — neither the Adam step
    (−lr·m̂/(√v̂+ε)) nor the decoupled weight decay (−lr·wd·θ) — under torch's AdamW, DeepSpeed's ZeRO optimizers
    and DeepSpeedCPUAdam alike. The tied output embedding (the decoder matrix is the word-embedding matrix) is an
    encoder weight here: frozen too; the head's own transform and bias train.

    What lr 0 cannot stop: the encoder still gets gradients (its parameters keep requires_grad, so backward
    computes and ZeRO reduces them) and its Adam moments m, v and step count advance during the warm-up.
    Accepted: zeroing those gradients per group is not possible from outside the ZeRO optimizers; m (β1 = 0.9)
    forgets the warm-up within tens of steps, and v remembers its large early gradients for longer (β2 = 0.999),
    which only makes the encoder's first updates smaller — the cautious side. Gradient clipping (a global norm)
    still counts the encoder's gradients, as in any step."""
    head = [g.get("task") == HEAD for g in groups]
    warm = [head_lr / g["lr"] if h else 0.0 for g, h in zip(groups, head)]
    said = set()

    def gate(step: int) -> list:
        if step < warmup:
            if "start" not in said:
                said.add("start")
                frozen = sum(not h for h in head)
                log.info(f"head warm-up: steps {step + 1}–{min(warmup, total_steps)} train the pre-training head only "
                    f"at lr {head_lr:g} ({why}); the encoder ({frozen} param groups) has lr 0"
                    + (" for the whole run" if warmup >= total_steps else ""))
            return warm
        if step == warmup < total_steps and "end" not in said:
            said.add("end")
            log.info(f"head warm-up done after step {warmup}: the encoder trains from step {warmup + 1} on, "
                f"optim's schedule starting there")
        elif step > warmup and not said:  # resumed after it
            said.add("end")
            log.info(f"head warm-up (steps 1–{warmup}, {why}) was done before step {step}")
        return [1.0] * len(head)

    return gate


def _cache_dir(cfg: PretrainConfig) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()


def builtin_tokenizer_cache(cfg: PretrainConfig):
    """(builtin corpus name, cache dir): what `load_tokenizer` needs for `model.tokenizer: builtin`."""
    return _builtin_name(cfg), _cache_dir(cfg)


def prepare_corpora(cfg: PretrainConfig, tokenizer):
    cache = _cache_dir(cfg)
    return [prepare_corpus(src, tokenizer, cfg.data.seq_len, cache, cfg.data.num_proc) for src in cfg.data.corpora]


def run(cfg: PretrainConfig, resume: bool = False, overwrite: bool = False, stage_name: Optional[str] = None) -> bool:
    """Train (or continue) one pre-training run. True when it finished, False when stopped early.
    stage_name: what the model card's lineage calls this stage (the recipe's ITPT / IDPT / CDPT)."""
    run = open_run(cfg, validate, resume, overwrite)
    if run.auto_micro_batch:
        raise UserError("train.micro_batch_size=auto is for fine-tuning; pre-training sequences all have "
                        "data.seq_len tokens — set the micro-batch (and train.global_batch_size to keep the global one)")
    cfg, out, accelerator, topo = run.cfg, run.out, run.accelerator, run.topo

    # each node's first process goes first, its other ranks then read what it made; across nodes sharing the cache
    # dir, the corpus lock lets one process prepare and makes the other nodes wait for it (and say for whom) —
    # logged by the main process, which either prepares or waits (trainer/data/cache.py; a take-over: every rank)
    with accelerator.local_main_process_first():
        tokenizer = load_tokenizer(cfg.model, *builtin_tokenizer_cache(cfg))
        corpora = prepare_corpora(cfg, tokenizer)
    loading_info: dict = {}
    model = build_model(cfg.model, tokenizer, head="pretraining" if cfg.data.nsp else "mlm", seed=cfg.seed,
                        loading_info=loading_info)
    missing_head = missing_head_weights(model, loading_info)  # before the masked-positions patch (same module)
    masked_only = use_masked_positions_only(model)  # vocabulary logits for the ~15 % masked positions only
    if cfg.data.seq_len > max_positions(model):
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds the model's position limit "
                        f"({max_positions(model)} max_position_embeddings)")

    order = GlobalOrder(corpora, [s.weight for s in cfg.data.corpora], cfg.seed)
    dataset = PackedDataset(corpora, order)
    collate = MLMCollator(tokenizer, cfg.seed, cfg.data.mlm_probability, cfg.data.whole_word_mask,
                          cfg.data.max_predictions, cfg.data.nsp, partner=dataset.partner_row)

    def batches(start: int):
        sampler = RankBatches(start, topo.rank, topo.world_size, cfg.train.micro_batch_size)
        # own generator: creating the iterator must not consume the global RNG (dropout stays resume-exact)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                             generator=torch.Generator().manual_seed(cfg.seed),
                                             num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
                                             persistent_workers=cfg.data.num_workers > 0,
                                             prefetch_factor=4 if cfg.data.num_workers > 0 else None)
        trace = None
        if cfg.train.trace_samples:
            (out / "samples").mkdir(exist_ok=True)
            trace = open(out / "samples" / f"rank{topo.rank}.txt", "a")
        for batch in loader:
            positions = batch.pop("positions")
            if trace:
                trace.write(" ".join(map(str, positions.tolist())) + "\n")
                trace.flush()
            yield batch

    def loss(model, batch):
        return model(**batch).loss

    steps = loop.total_steps(cfg.train, order.epoch_len,
                             cfg.train.micro_batch_size * cfg.train.grad_accum * topo.world_size)
    warmup = head_warmup_steps(cfg.train.head_warmup_steps, missing_head, steps)
    head_names = head_parameter_names(model)
    # a planned warm-up puts the head in groups of its own (task "head") so its lr can differ from the encoder's;
    # without one the groups stay as before (a run without warm-up keeps its optimizer layout and checkpoints)
    groups = build_param_groups(model, cfg.optim.lr, cfg.optim.weight_decay,
                                part=lambda name: HEAD if name in head_names else "encoder",
                                task_of=(lambda name: HEAD if name in head_names else None) if warmup else None)
    if warmup and not any(g["task"] == HEAD for g in groups):
        log.info("head warm-up skipped: the model has no trainable head parameters of its own")
        warmup = 0
    gate = None
    if warmup:
        why = (f"train.head_warmup_steps={cfg.train.head_warmup_steps}" if cfg.train.head_warmup_steps >= 0 else
               f"auto: the checkpoint has no weights for {_short_list(missing_head)}")
        gate = head_warmup_gate(groups, warmup, steps, cfg.train.head_warmup_lr, why)
    optimizer = make_optimizer(groups, cfg.optim.betas, cfg.optim.eps)
    pooler = dropped_pooler(cfg.model, model)  # read now: a hub cache may be gone by the end of a long run
    fpt = pretraining_flops_per_token(model.config, cfg.data.seq_len, cfg.data.mlm_probability,
                                      cfg.data.max_predictions, masked_only, cfg.data.nsp)
    job = loop.Job(model=model, optimizer=optimizer, batches=batches, loss=loss,
                   samples_per_epoch=order.epoch_len, flops_per_token=fpt, lr_gate=gate, schedule_start=warmup,
                   export=lambda acc, m, trained: export_hf(
                       acc, m, tokenizer, out / "hf_model", pooler,
                       card=lambda d: model_card.write(d, model_card.stage_record(
                           stage_name or "pretrain", to_dict(cfg), trained, order.epoch_len), to_dict(cfg.card),
                           final=out / "hf_model")))
    finished = train(run, job, groups)
    if finished:
        log.info(f"metrics: {out / 'metrics.jsonl'}")
        log.info(f"HF model: {out / 'hf_model'}")
    return finished


def _short_list(names: list, keep: int = 3) -> str:
    return ", ".join(names[:keep]) + (f" and {len(names) - keep} more" if len(names) > keep else "")
