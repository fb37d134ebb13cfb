"""Further pre-training (ITPT / IDPT / CDPT — the same job pointed at different text): masked LM (+ optional NSP)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .. import loop
from ..config import PretrainConfig, to_dict
from ..corpus.builtin import BUILTIN_PREFIX
from ..corpus.masking import MLMCollator
from ..corpus.prepare import default_cache_dir, prepare_corpus
from ..corpus.reader import GlobalOrder, PackedDataset, RankBatches
from ..distributed import make_accelerator, resolve_launch_settings
from ..errors import UserError
from ..flops import pretraining_flops_per_token
from ..masked_head import use_masked_positions_only
from ..model import build_model, dropped_pooler, load_tokenizer, max_positions
from ..optim.param_groups import build_param_groups, make_optimizer
from .common import (check_output_dir, claim_output_dir, export_hf, resume_train_config, save_resolved_config,
                     validate_train_optim)


def _builtin_name(cfg: PretrainConfig):
    for src in cfg.data.corpora:
        paths = src.path if isinstance(src.path, list) else [src.path]
        for p in paths:
            if isinstance(p, str) and p.startswith(BUILTIN_PREFIX):
                return p[len(BUILTIN_PREFIX):]
    return None


def validate(cfg: PretrainConfig) -> None:
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


def _cache_dir(cfg: PretrainConfig) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()


def builtin_tokenizer_cache(cfg: PretrainConfig):
    """(builtin corpus name, cache dir): what `load_tokenizer` needs for `model.tokenizer: builtin`."""
    return _builtin_name(cfg), _cache_dir(cfg)


def prepare_corpora(cfg: PretrainConfig, tokenizer, log=print):
    cache = _cache_dir(cfg)
    return [prepare_corpus(src, tokenizer, cfg.data.seq_len, cache, cfg.data.num_proc, log) for src in cfg.data.corpora]


def run(cfg: PretrainConfig, resume: bool = False, overwrite: bool = False) -> bool:
    """Train (or continue) one pre-training run. True when it finished, False when stopped early."""
    cfg = resolve_launch_settings(cfg)
    validate(cfg)
    out = Path(cfg.output_dir)
    check_output_dir(out, to_dict(cfg), resume, overwrite)
    cfg = replace(cfg, train=resume_train_config(out, resume, cfg.train, cfg.distributed.deepspeed_config))
    accelerator, topo = make_accelerator(precision=cfg.model.precision, micro_batch=cfg.train.micro_batch_size,
                                         grad_accum=cfg.train.grad_accum, max_grad_norm=cfg.train.max_grad_norm,
                                         deepspeed_config=cfg.distributed.deepspeed_config)

    # each node's first process goes first, its other ranks then read what it made; across nodes sharing the cache
    # dir, the corpus lock lets one process prepare and makes the other nodes wait for it (and say for whom) —
    # printed by whichever process prepares or waits, not only by the main one
    with accelerator.local_main_process_first():
        tokenizer = load_tokenizer(cfg.model, *builtin_tokenizer_cache(cfg))
        corpora = prepare_corpora(cfg, tokenizer, log=lambda msg: print(msg, flush=True))
    model = build_model(cfg.model, tokenizer, head="pretraining" if cfg.data.nsp else "mlm", seed=cfg.seed)
    masked_only = use_masked_positions_only(model)  # vocabulary logits for the ~15 % masked positions only
    if cfg.data.seq_len > max_positions(model):
        raise UserError(f"data.seq_len={cfg.data.seq_len} exceeds the model's position limit "
                        f"({max_positions(model)} max_position_embeddings)")
    resume_from = claim_output_dir(accelerator, out, resume, overwrite)
    save_resolved_config(accelerator, out, to_dict(cfg))

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

    groups = build_param_groups(model, cfg.optim.lr, cfg.optim.weight_decay)
    optimizer = make_optimizer(groups, cfg.optim.betas, cfg.optim.eps)
    pooler = dropped_pooler(cfg.model, model)  # read now: a hub cache may be gone by the end of a long run
    fpt = pretraining_flops_per_token(model.config, cfg.data.seq_len, cfg.data.mlm_probability,
                                      cfg.data.max_predictions, masked_only, cfg.data.nsp)
    job = loop.Job(model=model, optimizer=optimizer, batches=batches, loss=loss,
                   samples_per_epoch=order.epoch_len, flops_per_token=fpt,
                   export=lambda acc, m: export_hf(acc, m, tokenizer, out / "hf_model", pooler))
    loop_cfg = loop.LoopConfig(out, cfg.seed, cfg.train, cfg.optim, cfg.wandb, to_dict(cfg))
    finished = loop.run(job, loop_cfg, accelerator, topo, resume_from)
    if finished:
        accelerator.print(f"metrics: {out / 'metrics.jsonl'}\nHF model: {out / 'hf_model'}")
    return finished
