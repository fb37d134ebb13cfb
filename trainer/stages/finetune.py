"""Fine-tuning for classification with the paper's strategies: truncation / hierarchy, layer choice and pooling,
layer-wise decayed learning rates, schedules, few-shot, frozen-feature baseline. Best-on-dev, test once."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import loop
from ..classifier import Classifier
from ..config import FinetuneConfig, to_dict
from ..distributed import make_accelerator
from ..errors import UserError
from ..metrics import classification_metrics
from ..model import load_tokenizer, max_positions
from ..optim.layer_decay import layer_decay_scales
from ..optim.param_groups import build_param_groups, describe_groups, make_optimizer
from ..text import truncation
from ..text.batching import Collator, example_lengths, rank_eval_batches, rank_train_batches
from ..text.data import load_task
from .common import prepare_output_dir, save_resolved_config


def validate(cfg: FinetuneConfig) -> None:
    if cfg.optim.lr <= 0:
        raise UserError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if not 0 < cfg.optim.layer_decay <= 1:
        raise UserError(f"optim.layer_decay (ξ) must be in (0, 1], got {cfg.optim.layer_decay}")
    for key in ("micro_batch_size", "grad_accum", "log_every"):
        if getattr(cfg.train, key) < 1:
            raise UserError(f"train.{key} must be >= 1, got {getattr(cfg.train, key)}")
    if cfg.train.max_steps == 0 or cfg.train.max_steps < -1:
        raise UserError(f"train.max_steps must be > 0, or -1 to run train.epochs; got {cfg.train.max_steps}")
    if not 0 <= cfg.head.dropout < 1:
        raise UserError(f"head.dropout must be in [0, 1), got {cfg.head.dropout}")


def build_encoder(cfg: FinetuneConfig, tokenizer):
    """The encoder alone (no MLM/classification head): from a checkpoint, or random init from `model.config`."""
    from transformers import AutoModel
    from ..model import _auto_config
    conf = _auto_config(cfg.model, tokenizer)
    try:
        if cfg.model.name_or_path:
            return AutoModel.from_pretrained(cfg.model.name_or_path, config=conf,
                                             attn_implementation=cfg.model.attn_implementation)
        torch.manual_seed(cfg.seed)
        return AutoModel.from_config(conf, attn_implementation=cfg.model.attn_implementation)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load encoder '{cfg.model.name_or_path}': {str(exc).splitlines()[0]}") from None


def run(cfg: FinetuneConfig, resume: bool = False, overwrite: bool = False) -> Path:
    validate(cfg)
    out = Path(cfg.output_dir)
    accelerator, topo = make_accelerator(precision=cfg.model.precision, micro_batch=cfg.train.micro_batch_size,
                                         grad_accum=cfg.train.grad_accum, max_grad_norm=cfg.train.max_grad_norm,
                                         deepspeed_config=cfg.distributed.deepspeed_config)
    resume_from = prepare_output_dir(accelerator, out, to_dict(cfg), resume, overwrite)
    with accelerator.local_main_process_first():
        tokenizer = load_tokenizer(cfg.model, "grammar", _cache_dir())
    splits, labels, vocab = load_task(cfg.data, cfg.seed, log=accelerator.print)
    encoder = build_encoder(cfg, tokenizer)
    truncation.validate(cfg.text, len(cfg.data.text_fields), max_positions(encoder))
    model = Classifier(encoder, len(vocab), cfg.head, cfg.text)
    if cfg.model.gradient_checkpointing:
        encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    save_resolved_config(accelerator, out, to_dict(cfg))

    text_encoder = truncation.Encoder(tokenizer, cfg.text)
    encoded = {name: text_encoder.encode(split.texts) for name, split in splits.items()}
    lengths = {name: example_lengths(enc) for name, enc in encoded.items()}
    collate = Collator(tokenizer.pad_token_id, cfg.text.strategy == "hierarchical")
    accelerator.print(" · ".join(f"{name}: {len(enc)} examples" for name, enc in encoded.items()) +
                      f" · labels: {vocab}")

    def batches(start: int):
        for idx in rank_train_batches(lengths["train"], cfg.train.micro_batch_size, topo.world_size, topo.rank,
                                      cfg.seed, start):
            yield collate([encoded["train"][i] for i in idx], labels["train"][idx])

    def predict(model, split: str) -> np.ndarray:
        """Logits for every example of `split`, gathered from all ranks (each rank runs equal batch counts)."""
        chunks = []
        for idx, valid in rank_eval_batches(lengths[split], cfg.data.eval_batch_size, topo.world_size, topo.rank):
            batch = collate([encoded[split][i] for i in idx], labels[split][idx])
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            _, logits = model(**batch)
            keep = torch.as_tensor(valid, device=accelerator.device)
            packed = torch.cat([torch.as_tensor(idx, device=accelerator.device).unsqueeze(1).float(),
                                keep.unsqueeze(1).float(), logits.float()], dim=1)
            chunks.append(accelerator.gather(packed).cpu())
        table = torch.cat(chunks)
        table = table[table[:, 1] > 0]
        logits = torch.empty((len(labels[split]), len(vocab)))
        logits[table[:, 0].long()] = table[:, 2:]
        return logits.numpy()

    def evaluate_split(model, split: str) -> dict:
        return classification_metrics(predict(model, split).argmax(-1), labels[split], len(vocab))

    def export(acc, trained):
        trained.eval()
        with torch.no_grad():
            results = {split: evaluate_split(trained, split) for split in encoded if split != "train"}
        state_dict = acc.get_state_dict(trained)
        if acc.is_main_process:
            (out / "eval_results.json").write_text(json.dumps(results, indent=1))
            for split, r in results.items():
                acc.print(f"{split}: accuracy {r['accuracy']:.4f} · error {r['error_rate']:.4f} · "
                          f"macro-F1 {r['macro_f1']:.4f} ({r['n']} examples)")
            _export_atomically(acc.unwrap_model(trained), out / "hf_model", state_dict, tokenizer, vocab,
                               cfg.data.text_fields)
        acc.wait_for_everyone()

    if cfg.optim.layer_decay < 1 and not cfg.head.freeze_encoder:
        scale, part = layer_decay_scales(model, encoder, cfg.optim.layer_decay)
    else:
        scale, part = None, layer_decay_scales(model, encoder, 1.0)[1]
    groups = build_param_groups(model, cfg.optim.lr, cfg.optim.weight_decay, lr_scale=scale, part=part)
    if not groups:
        raise UserError("no trainable parameters")
    if accelerator.is_main_process:
        (out / "param_groups.json").write_text(json.dumps(describe_groups(groups), indent=1))
    optimizer = make_optimizer(groups, cfg.optim.betas, cfg.optim.eps)

    def loss(model, batch):
        return model(**batch)[0]

    job = loop.Job(model=model, optimizer=optimizer, batches=batches, loss=loss,
                   samples_per_epoch=len(encoded["train"]), export=export,
                   evaluate=lambda m: evaluate_split(m, "dev"))
    loop_cfg = loop.LoopConfig(out, cfg.seed, cfg.train, cfg.optim, cfg.wandb, to_dict(cfg))
    if loop.run(job, loop_cfg, accelerator, topo, resume_from):
        accelerator.print(f"eval results: {out / 'eval_results.json'}\nmodel: {out / 'hf_model'}")
    accelerator.end_training()
    return out


def _cache_dir():
    from ..corpus.prepare import default_cache_dir
    return default_cache_dir()


def _export_atomically(model: Classifier, target: Path, state_dict: dict, tokenizer, vocab: list,
                       text_fields: list) -> None:
    import shutil
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp, state_dict, tokenizer, vocab, text_fields)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
