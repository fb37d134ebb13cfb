"""Real data end to end: TREC-6 from ../shared/data, a WordPiece tokenizer trained on its train split on the fly,
a tiny BERT from a config, 2 ranks under ZeRO-2 — trains, selects on a carved dev split, evaluates test once."""
from __future__ import annotations

import json
from collections import Counter

import pytest

from conftest import shared_data
from launching import metrics, run

TREC = shared_data() / "trec"


@pytest.mark.skipif(not (TREC / "train.jsonl").is_file(), reason="../shared/data/trec is not present")
def test_trec_trains_and_evaluates(tmp_path):
    from trainer.data.builtin import train_wordpiece_tokenizer
    texts = [json.loads(line)["text"] for line in (TREC / "train.jsonl").read_text().splitlines()]
    tok_dir = train_wordpiece_tokenizer(texts, 3000, tmp_path / "tokenizer")
    out = tmp_path / "run"
    run("cpu_zero2", out, f"model.tokenizer={tok_dir}", "model.config.num_hidden_layers=2",
        f"data.train={TREC / 'train.jsonl'}", f"data.test={TREC / 'test.jsonl'}", "text.max_len=48",
        "train.epochs=2", "train.micro_batch_size=32", "train.eval_every=0", "optim.lr=2e-3",
        "optim.layer_decay=0.9", cache=tmp_path / "cache", script="finetune.py", config="configs/finetune/tiny.yaml")
    results = json.loads((out / "eval_results.json").read_text())
    gold = Counter(json.loads(line)["label"] for line in (TREC / "test.jsonl").read_text().splitlines())
    majority_error = 1 - max(gold.values()) / sum(gold.values())
    assert results["test"]["n"] == sum(gold.values()) == 500
    assert len(results["test"]["confusion_matrix"]) == 6
    assert results["test"]["error_rate"] < 0.6 * majority_error, results["test"]
    dev_lines = [r for r in metrics(out) if r.get("split") == "dev"]
    assert len(dev_lines) == 2 and all(r["n"] == 546 for r in dev_lines)
    recipe = json.loads((out / "hf_model" / "bert_recipe.json").read_text())
    assert recipe["labels"] == sorted(gold)
