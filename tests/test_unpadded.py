"""model.attn_implementation=unpadded: a packed batch (no padding, attention per sequence) gives the padded path's
logits, loss and gradients — BERT, RoBERTa (positions offset by padding_idx + 1), ELECTRA; the pooler, chosen
layers and hierarchical chunks — and a fine-tuning run with it trains; unsupported models are refused."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from launching import REPO, error_lines, run
from tiny_data import TINY, data_overrides, tiny_splits
from trainer import unpadded
from trainer.classifier import Classifier
from trainer.config import HeadConfig, TextConfig
from trainer.errors import UserError
from trainer.text.batching import Collator

PAD = 0


def encoder(model_type: str):
    from transformers import AutoConfig, AutoModel
    conf = AutoConfig.for_model(model_type, vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=80, pad_token_id=PAD,
                                attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
                                **({"embedding_size": 32} if model_type == "electra" else {}))
    torch.manual_seed(0)
    return AutoModel.from_config(conf, attn_implementation="sdpa", dtype=torch.float32)


def examples(hierarchical: bool, seed: int = 0) -> list:
    """Encoded examples of different lengths (hierarchical: 1-3 chunks each), token types in the second half."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (5, 17, 9, 30, 2, 23):
        chunks = []
        for _ in range(rng.integers(1, 4) if hierarchical else 1):
            ids = [2, *rng.integers(5, 97, n).tolist(), 3]
            chunks.append((ids, [0] * (len(ids) // 2) + [1] * (len(ids) - len(ids) // 2)))
        out.append(chunks)
    return out


@pytest.mark.parametrize("model_type", ["bert", "roberta", "electra"])
@pytest.mark.parametrize("head, strategy", [  # (head dropout 0: train mode stays deterministic)
    (HeadConfig(dropout=0.0), "head"), (HeadConfig(layers=[1, 3], layer_pool="concat", pooler=False, dropout=0.0), "head"),
    (HeadConfig(layers=[2, 3], layer_pool="mean", dropout=0.0), "hierarchical")])
def test_packed_batch_gives_the_padded_logits_loss_and_gradients(model_type, head, strategy):
    enc = encoder(model_type)
    model = Classifier(enc, 4, head, TextConfig(strategy=strategy, max_len=32, chunk_pool="mean"))
    unpadded.check(enc.config)
    hier = strategy == "hierarchical"
    data, labels = examples(hier), np.array([0, 1, 2, 3, 1, 0])
    padded = Collator(PAD, hier)(data, labels)
    packed = Collator(PAD, hier, unpadded=True, position_offset=unpadded.position_offset(enc.config))(data, labels)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, int(padded["attention_mask"].sum()))
    model.train()  # dropout is 0: train mode is deterministic and exercises the training path
    loss_a, logits_a = model(**padded)
    grads_a = torch.autograd.grad(loss_a, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    model.encoder.set_attn_implementation(unpadded.register())
    loss_b, logits_b = model(**packed)
    grads_b = torch.autograd.grad(loss_b, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    torch.testing.assert_close(logits_b, logits_a, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss_b, loss_a, atol=2e-5, rtol=1e-4)
    for ga, gb in zip(grads_a, grads_b):
        if ga is not None:
            torch.testing.assert_close(gb, ga, atol=5e-5, rtol=1e-3)


def test_positions_restart_at_each_sequence():
    data = [[([2, 7, 3], [0, 0, 0])], [([2, 8, 9, 10, 3], [0, 0, 1, 1, 1])]]
    b = Collator(PAD, False, unpadded=True, position_offset=1)(data, [0, 1])
    assert b["position_ids"].tolist() == [[1, 2, 3, 1, 2, 3, 4, 5]]
    assert b["cu_seqlens"].tolist() == [0, 3, 8] and b["max_seqlen"] == 5
    assert b["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]


def test_unsupported_models_and_attention_dropout_are_refused():
    from transformers import AutoConfig
    with pytest.raises(UserError, match="deberta-v2 is not one"):
        unpadded.check(AutoConfig.for_model("deberta-v2"))
    with pytest.raises(UserError, match="attention_probs_dropout_prob=0.1"):
        unpadded.check(AutoConfig.for_model("bert"))


def test_finetuning_with_unpadded_attention_trains(tmp_path):
    (tmp_path / "data").mkdir()
    data = tiny_splits(tmp_path / "data")
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    run(None, out, *data_overrides(data), *TINY, "model.attn_implementation=unpadded",
        "model.config.attention_probs_dropout_prob=0", "train.max_steps=30", "train.eval_every=30", cache=cache,
        script="finetune.py", config="configs/finetune/tiny.yaml")
    import json
    results = json.loads((out / "eval_results.json").read_text())
    assert results["test"]["accuracy"] > 0.5
    refused = run(None, tmp_path / "refused", *data_overrides(data), *TINY, "model.attn_implementation=unpadded",
                  cache=cache, script="finetune.py", config="configs/finetune/tiny.yaml", check=False)
    assert refused.returncode == 2 and "attention_probs_dropout_prob" in error_lines(refused.stderr)[0]
    pre = run(None, tmp_path / "pre", "model.attn_implementation=unpadded", cache=cache, check=False)
    assert pre.returncode == 2 and "for fine-tuning" in error_lines(pre.stderr)[0]
    assert REPO.is_dir()
