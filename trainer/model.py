"""Tokenizer and BERT-family model loading — the one loader of every stage: a hub name or local dir via Auto
classes, or a config for random init; a masked-LM model for pre-training, a bare encoder for a classifier."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from .config import ModelConfig
from .errors import UserError

log = logging.getLogger(__name__)


def load_tokenizer(cfg: ModelConfig, builtin_corpus: Optional[str] = None, cache_dir: Optional[Path] = None):
    """`model.tokenizer: builtin` trains a WordPiece tokenizer on the builtin corpus (cached)."""
    from transformers import AutoTokenizer
    name = cfg.tokenizer or cfg.name_or_path
    if name == "builtin":
        from .data.builtin import builtin_tokenizer_dir
        name = str(builtin_tokenizer_dir(Path(cache_dir), builtin_corpus or "grammar", cfg.tokenizer_vocab_size))
    if not name:
        raise UserError("set model.name_or_path or model.tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer '{name}': {str(exc).splitlines()[0]}") from None
    if not getattr(tok, "is_fast", False):
        raise UserError(f"tokenizer '{name}' has no fast (Rust) version; corpus preparation needs one")
    if cfg.name_or_path and name != cfg.name_or_path and not cfg.tokenizer_mismatch_ok:
        _refuse_foreign_tokenizer(cfg, tok)
    return tok


def _refuse_foreign_tokenizer(cfg: ModelConfig, tok) -> None:
    """A pretrained model learnt its embeddings for its own token ids; another vocabulary trains silently on
    ids that mean other words. Compared with the model's own tokenizer, or, if it ships none, its vocab size."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import cached_file

    def ships(name):
        try:
            return cached_file(cfg.name_or_path, name, _raise_exceptions_for_missing_entries=False) is not None
        except OSError:
            return False

    if any(ships(f) for f in ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "spm.model")):
        own = AutoTokenizer.from_pretrained(cfg.name_or_path)
        same, theirs = own.get_vocab() == tok.get_vocab(), len(own)
    else:  # (AutoTokenizer would build an empty tokenizer from the model config alone)
        theirs = getattr(AutoConfig.from_pretrained(cfg.name_or_path), "vocab_size", None)
        same = theirs == len(tok)
    if not same:
        raise UserError(f"model.tokenizer={cfg.tokenizer!r} ({len(tok)} pieces) is not the vocabulary "
                        f"{cfg.name_or_path} was trained with ({theirs} pieces); drop model.tokenizer to use the "
                        f"model's own, or set model.tokenizer_mismatch_ok=true")


# config keys that change weight shapes: overriding them on a pretrained model cannot load its weights
_SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size", "max_position_embeddings", "type_vocab_size", "embedding_size")


def _pretrained_config(cfg: ModelConfig, **extra):
    """The pretrained config with `model.config` applied as overrides (dropout and the like), each key checked:
    one the model type does not have, or one that changes weight shapes, is refused rather than ignored."""
    from transformers import AutoConfig
    conf = AutoConfig.from_pretrained(cfg.name_or_path, **extra)
    for key, value in (cfg.config or {}).items():
        if not hasattr(conf, key):
            raise UserError(f"model.config.{key}: {conf.model_type} configs have no such key")
        if key in _SHAPE_KEYS and getattr(conf, key) != value:
            raise UserError(f"model.config.{key}={value!r} differs from {cfg.name_or_path} "
                            f"({getattr(conf, key)!r}); the pretrained weights would not fit — remove model.config.{key}, or set "
                            f"model.config=null to use the checkpoint's architecture as it is")
        setattr(conf, key, value)
    if cfg.config:
        log.info(f"model.config overrides on {cfg.name_or_path}: {cfg.config}")
    return conf


def instantiate(make, cfg: ModelConfig, what: str):
    """`make(attn_implementation)` → model. `auto` asks for PyTorch SDPA and, where the model class lacks it
    (DeBERTa-v2, for one), falls back to eager with one log line — the same model, slower kernel. An explicit
    choice the model cannot honour stays an error."""
    want = "sdpa" if cfg.attn_implementation == "auto" else cfg.attn_implementation
    if want == "unpadded":  # built with SDPA; fine-tuning switches to the packed kernel (unpadded.py)
        want = "sdpa"
    try:
        return make(want)
    except ValueError as exc:
        if cfg.attn_implementation != "auto" or "attention" not in str(exc).lower():
            raise UserError(f"cannot load {what}: {str(exc).splitlines()[0]}") from None
        log.info(f"{what} has no {want} attention; using eager (model.attn_implementation=auto)")
        return make("eager")


def model_config(cfg: ModelConfig, tokenizer, **extra):
    """The transformers config of the model to build: the checkpoint's (with `model.config` overrides) or, for
    random init, `model.config` with the tokenizer's vocabulary size and pad id."""
    from transformers import AutoConfig
    try:
        if cfg.name_or_path:
            conf = _pretrained_config(cfg, **extra)
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


def build_model(cfg: ModelConfig, tokenizer, head: str = "mlm", seed: int = 0, loading_info: Optional[dict] = None,
                **extra):
    """head: `mlm` (masked LM), `pretraining` (MLM + NSP), `encoder` (the bare encoder a classifier wraps).
    Weights in fp32 whatever the checkpoint's dtype (the engine casts for bf16/fp16 itself and keeps fp32
    masters), built whole on every rank (DeepSpeed partitions it in prepare()), fresh weights seeded by `seed`.
    `loading_info`, when given, is filled with what transformers reports on loading a pretrained checkpoint
    (`missing_keys`: weights it initialised at random, e.g. the MLM head of an encoder saved without one — see
    `missing_head_weights`); left empty for random init."""
    import torch
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForPreTraining
    auto = {"mlm": AutoModelForMaskedLM, "pretraining": AutoModelForPreTraining, "encoder": AutoModel}[head]
    if loading_info is not None:
        loading_info.clear()
    conf = model_config(cfg, tokenizer, **extra)
    from .classifier import plain_init
    torch.manual_seed(seed)  # fresh weights independent of whatever ran before in the process

    def make(attn):
        if cfg.name_or_path:
            model, info = auto.from_pretrained(cfg.name_or_path, config=conf, attn_implementation=attn,
                                               dtype=torch.float32, output_loading_info=True)
            if loading_info is not None:
                loading_info.update(info)
            return model
        return auto.from_config(conf, attn_implementation=attn, dtype=torch.float32)

    try:
        with plain_init():  # whole on every rank; DeepSpeed partitions it in prepare()
            model = instantiate(make, cfg, conf.model_type)
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


def head_parameter_names(model) -> set[str]:
    """Names (as `model.named_parameters()` gives them) of the parameters outside `model.base_model`: the
    pre-training head's own weights (BERT's `cls.predictions.transform.*` and bias, the NSP classifier). Decided
    by identity, not by name, so a weight shared with the encoder — the decoder matrix tied to the word
    embeddings — counts as the encoder's."""
    base = getattr(model, "base_model", model)
    if base is model:
        return set()
    encoder = {id(p) for p in base.parameters()}
    return {name for name, p in model.named_parameters() if id(p) not in encoder}


def missing_head_weights(model, loading_info: dict) -> list[str]:
    """The head weights (outside `model.base_model`) that the starting checkpoint lacked, so transformers
    initialised them at random: an encoder saved without its MLM head (sentence encoders, e5/bge-style models,
    classifiers, a bare `BertModel`). Empty for a checkpoint with its head, and for a model built from
    `model.config` (`loading_info` empty: everything is random, nothing to protect)."""
    base = getattr(model, "base_model", model)
    if base is model:
        return []
    prefix = f"{model.base_model_prefix}."
    return sorted(k for k in loading_info.get("missing_keys", ()) if not k.startswith(prefix))


def max_positions(model) -> int:
    """Longest input the model can embed. RoBERTa-style embeddings start positions at padding_idx + 1."""
    limit = int(getattr(model.config, "max_position_embeddings", 512))
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    offset = getattr(embeddings, "padding_idx", None)
    return limit - offset - 1 if isinstance(offset, int) else limit


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
