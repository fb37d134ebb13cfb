"""Tokenize and pack the corpora of a pre-training config into memory-mapped shards (cached).

pretrain.py does this on its own when the cache lacks a corpus; run this first for large corpora
(no GPUs held while tokenizing, `data.num_proc` workers):
    python launch/prepare_corpus.py --config configs/pretrain/bert_base_itpt.yaml [key.sub=value ...]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.cli import parse_args  # noqa: E402
from trainer.config import PretrainConfig  # noqa: E402
from trainer.errors import cli_entry  # noqa: E402


@cli_entry
def main():
    _, cfg = parse_args(PretrainConfig, __doc__)
    from trainer.stages.pretrain import builtin_tokenizer_cache, prepare_corpora, validate
    from trainer.model import load_tokenizer
    validate(cfg)
    tokenizer = load_tokenizer(cfg.model, *builtin_tokenizer_cache(cfg))
    for src, corpus in zip(cfg.data.corpora, prepare_corpora(cfg, tokenizer)):
        print(f"{src.path}: {corpus.rows} sequences of {cfg.data.seq_len} tokens in {corpus.path}")


if __name__ == "__main__":
    main()
