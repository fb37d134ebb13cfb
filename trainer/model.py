"""Tokenizer and BERT-family model loading: a hub name or local dir via Auto classes, or a config for random init."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .config import ModelConfig
from .errors import UserError


def load_tokenizer(cfg: ModelConfig, builtin_corpus: Optional[str] = None, cache_dir: Optional[Path] = None):
    """`model.tokenizer: builtin` trains a WordPiece tokenizer on the builtin corpus (cached)."""
    from transformers import AutoTokenizer
    name = cfg.tokenizer or cfg.name_or_path
    if name == "builtin":
        from .corpus.builtin import builtin_tokenizer_dir
        name = str(builtin_tokenizer_dir(Path(cache_dir), builtin_corpus or "grammar", cfg.tokenizer_vocab_size))
    if not name:
        raise UserError("set model.name_or_path or model.tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer '{name}': {str(exc).splitlines()[0]}") from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"tokenizer '{name}' has no fast (Rust) version; corpus preparation needs one")
    return tok


def _auto_config(cfg: ModelConfig, tokenizer, **extra):
    from transformers import AutoConfig
    try:
        if cfg.name_or_path:
            conf = AutoConfig.from_pretrained(cfg.name_or_path, **extra)
        else:
            if not cfg.config or "model_type" not in cfg.config:
                raise UserError("model.config needs a model_type (e.g. bert) when model.name_or_path is not set")
            kwargs = dict(cfg.config)
            kwargs.setdefault("vocab_size", len(tokenizer))
            kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
            conf = AutoConfig.for_model(**kwargs, **extra)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot build model config: {str(exc).splitlines()[0]}") from None
    return conf


def build_model(cfg: ModelConfig, tokenizer, head: str = "mlm", seed: int = 0, **extra):
    """head: `mlm` (masked LM), `pretraining` (MLM + NSP)."""
    import torch
    from transformers import AutoModelForMaskedLM, AutoModelForPreTraining
    auto = {"mlm": AutoModelForMaskedLM, "pretraining": AutoModelForPreTraining}[head]
    conf = _auto_config(cfg, tokenizer, **extra)
    conf._attn_implementation = cfg.attn_implementation
    from .classifier import plain_init
    torch.manual_seed(seed)  # fresh weights independent of whatever ran before in the process
    try:
        with plain_init():  # whole on every rank; DeepSpeed partitions it in prepare()
            if cfg.name_or_path:
                model = auto.from_pretrained(cfg.name_or_path, config=conf, attn_implementation=cfg.attn_implementation)
            else:
                model = auto.from_config(conf, attn_implementation=cfg.attn_implementation)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model '{cfg.name_or_path}': {str(exc).splitlines()[0]}") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary holds "
                        f"{model.get_input_embeddings().num_embeddings}")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        model.compile()  # in place: the module (and its state_dict keys) stays the same for saving
    return model


def max_positions(model) -> int:
    """Longest input the model can embed. RoBERTa-style embeddings start positions at padding_idx + 1."""
    limit = int(getattr(model.config, "max_position_embeddings", 512))
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    offset = getattr(embeddings, "padding_idx", None)
    return limit - offset - 1 if isinstance(offset, int) else limit


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: all but embedding tables (lookups), plus the
    output projection onto the vocabulary when it is tied to them (its FLOPs are real, its weights shared)."""
    import torch
    emb = model.get_input_embeddings().weight
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    n = sum(p.numel() for p in model.parameters() if id(p) not in lookups)
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and out.weight is emb:
        n += emb.numel()
    return n


def dropped_pooler(cfg: ModelConfig, model) -> dict:
    """The starting checkpoint's pooler tensors, keyed as `model` would save them, when `model` has no pooler.

    HF's masked-LM classes build their encoder without the pooler, so a pre-training run exporting one would
    silently drop the (NSP-trained) pooler of e.g. bert-base, and a classifier reading the pooler would start
    from random weights. MLM does not train the pooler: the export carries the original over unchanged
    (read from the checkpoint's safetensors files)."""
    if not cfg.name_or_path or getattr(model.base_model, "pooler", None) is not None:
        return {}
    import json
    from safetensors import safe_open
    from transformers.utils import cached_file
    found = {}

    def locate(name):
        try:
            return cached_file(cfg.name_or_path, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None

    index = locate("model.safetensors.index.json")
    if index:
        shards = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        files = [locate(s) for s in shards]
    else:
        files = [locate("model.safetensors")]
    for path in filter(None, files):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if "pooler." in key:
                    found[f"{model.base_model_prefix}.{key[key.index('pooler.'):]}"] = f.get_tensor(key)
    return found
