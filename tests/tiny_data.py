"""A tiny 3-class text classification set (food / sport / tech by vocabulary), written as jsonl files."""
from __future__ import annotations

import json
from pathlib import Path

LABELS = ["food", "sport", "tech"]
WORDS = {"sport": "ball goal team match player score", "food": "bread cheese soup apple dinner cook",
         "tech": "computer code server chip data network"}
TINY = ("train.max_steps=3", "train.eval_every=3", "data.eval_batch_size=64")


def rows(n: int, seed: int) -> list[dict]:
    import random
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = LABELS[i % 3]
        words = WORDS[label].split()
        out.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 25))), "label": label})
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def tiny_splits(d: Path) -> dict:
    return {"train": write_jsonl(d / "train.jsonl", rows(48, 1)), "dev": write_jsonl(d / "dev.jsonl", rows(12, 2)),
            "test": write_jsonl(d / "test.jsonl", rows(9, 3)), "dir": d}


def data_overrides(data, **replace) -> list[str]:
    files = {k: data[k] for k in ("train", "dev", "test")}
    files.update(replace)
    return [f"data.{k}={v}" for k, v in files.items()]


def save_tiny_bert(path: Path, cache: Path, layers: int) -> Path:
    """A tiny BERT encoder (seeded) saved to `path`, vocabulary of the builtin tokenizer in `cache`: the weights
    before fine-tuning are known exactly."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel
    from trainer.data.builtin import builtin_tokenizer_dir
    tok = AutoTokenizer.from_pretrained(builtin_tokenizer_dir(cache, "grammar", 1000))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=layers, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=128)).save_pretrained(path)
    return path
