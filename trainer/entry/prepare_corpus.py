"""Tokenize and pack the corpora of a pre-training config into memory-mapped shards (cached).

Pre-training does this on its own when the cache lacks a corpus; run this first for large corpora
(no GPUs held while tokenizing, `data.num_proc` workers):
    python -m trainer.entry.prepare_corpus --config configs/pretrain/bert_base_itpt.yaml [key.sub=value ...]
    (or python launch/prepare_corpus.py …)
"""
import logging

from trainer.cli import parse_args
from trainer.config import PretrainConfig
from trainer.errors import cli_entry

log = logging.getLogger(__name__)


@cli_entry
def main():
    _, cfg = parse_args(PretrainConfig, __doc__)
    from trainer.model import load_tokenizer
    from trainer.stages.pretrain import builtin_tokenizer_cache, prepare_corpora, validate
    validate(cfg)
    tokenizer = load_tokenizer(cfg.model, *builtin_tokenizer_cache(cfg))
    for src, corpus in zip(cfg.data.corpora, prepare_corpora(cfg, tokenizer)):
        log.info(f"{src.path}: {corpus.rows} sequences of {cfg.data.seq_len} tokens in {corpus.path}")


if __name__ == "__main__":
    main()
