"""MFU's FLOPs per token (trainer/flops.py): hand counts for BERT-base/large, the model's own Linear weights, and
PyTorch's FLOP counter on a real forward + backward of the masked-positions-only loss."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForPreTraining

from trainer.flops import (Dims, attention_flops, encoder_matmul_flops, finetuning_flops_per_token, mlm_head_flops,
                           mlm_projected_share, pretraining_flops_per_token, training_flops_per_sequence,
                           training_flops_per_token)
from trainer.masked_head import use_masked_positions_only

BASE = Dims(layers=12, hidden=768, intermediate=3072, vocab=30522)
LARGE = Dims(layers=24, hidden=1024, intermediate=4096, vocab=30522)


def _issue_formula(L, d, V, s, m):
    """The issue's per-sequence count for a 4d feed-forward: 3·s·[L·(24d² + 4sd) + m·(2d² + 2dV)]."""
    return 3 * s * (L * (24 * d * d + 4 * s * d) + m * (2 * d * d + 2 * d * V))


def test_bert_base_seq128_hand_count():
    # per token, forward, one layer: QKV+O 4·2·768² = 4,718,592; FFN 2·2·768·3072 = 9,437,184;
    # attention 2·2·128·768 = 393,216 → 14,548,992; × 12 layers = 174,587,904
    # MLM head per projected position: 2·768² + 2·768·30522 = 48,061,440
    per_seq = 3 * 128 * (174_587_904 + 0.15 * 48_061_440)
    assert training_flops_per_sequence(BASE, 128, projected_share=0.15) == pytest.approx(per_seq, rel=1e-12)
    assert per_seq == pytest.approx(_issue_formula(12, 768, 30522, 128, 0.15), rel=1e-12)
    assert training_flops_per_token(BASE, 128, 0.15) == pytest.approx(per_seq / 128, rel=1e-12)
    # projecting every position (HF's head; what the old 6·N + 12·L·d·s counted) overstates it ~1.22×
    overstated = training_flops_per_token(BASE, 128, 1.0) / training_flops_per_token(BASE, 128, 0.15)
    assert 1.2 < overstated < 1.25


@pytest.mark.parametrize("s", [128, 512])
def test_bert_large_hand_count(s):
    d, f, L, V = 1024, 4096, 24, 30522
    layer = 4 * 2 * d * d + 2 * 2 * d * f + 2 * 2 * s * d  # 8,388,608 + 16,777,216 + 4·s·1024
    assert layer == 25_165_824 + 4096 * s
    head = 2 * d * d + 2 * d * V  # 2,097,152 + 62,509,056
    assert head == 64_606_208
    per_seq = 3 * s * (L * layer + 0.15 * head)
    assert training_flops_per_sequence(LARGE, s, 0.15) == pytest.approx(per_seq, rel=1e-12)
    assert per_seq == pytest.approx(_issue_formula(L, d, V, s, 0.15), rel=1e-12)
    if s == 128:
        assert per_seq == pytest.approx(3 * 128 * (24 * (25_165_824 + 524_288) + 9_690_931.2), rel=1e-12)


def test_general_feed_forward_width():
    dims = Dims(layers=2, hidden=10, intermediate=7)
    assert encoder_matmul_flops(dims) == 2 * (8 * 100 + 4 * 10 * 7)
    assert attention_flops(dims, 5) == 4 * 2 * 5 * 10


def _linear_weights(module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


def test_matmuls_equal_twice_the_linear_weights():
    conf = AutoConfig.for_model("bert", vocab_size=500, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                intermediate_size=200, max_position_embeddings=64)
    model = AutoModelForMaskedLM.from_config(conf)
    dims = Dims.of(model.config)
    assert dims == Dims(3, 64, 200, 500, 0)
    assert encoder_matmul_flops(dims) == 2 * _linear_weights(model.bert.encoder)
    # the head: transform d×d and the (tied) decoder d×V
    assert mlm_head_flops(dims) == 2 * _linear_weights(model.cls)


def test_matmuls_albert_shared_layers_and_factorised_embedding():
    conf = AutoConfig.for_model("albert", vocab_size=500, embedding_size=16, hidden_size=64, num_hidden_layers=4,
                                num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)
    model = AutoModelForMaskedLM.from_config(conf)
    dims = Dims.of(model.config)
    assert dims == Dims(4, 64, 128, 500, 16)
    enc = model.albert.encoder
    # one set of layer weights, executed num_hidden_layers times, plus the e → d mapping
    per_token = 4 * _linear_weights(enc.albert_layer_groups) + _linear_weights(enc.embedding_hidden_mapping_in)
    assert encoder_matmul_flops(dims) == 2 * per_token
    assert mlm_head_flops(dims) == 2 * _linear_weights(model.predictions)


def _counted(model, batch) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        loss = model(**batch).loss
        loss.backward()
    return counter.get_total_flops()


def _tiny(model_type="bert", **kw):
    return AutoConfig.for_model(model_type, vocab_size=400, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=80, max_position_embeddings=64,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def test_formula_equals_counted_flops_of_the_masked_loss():
    """A real forward + backward (PyTorch's FLOP counter): the masked-positions-only loss costs exactly the
    formula with m = masked share; the old count (every position projected) is what HF's forward costs."""
    conf = _tiny()
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(conf, attn_implementation="eager")
    B, s = 3, 24
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 400, (B, s), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, 1:5] = ids[:, 1:5]  # 4 of 24 positions projected
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    dims = Dims.of(conf)
    full = _counted(model, batch)
    assert full == pytest.approx(B * training_flops_per_sequence(dims, s, projected_share=1.0), rel=1e-9)
    assert use_masked_positions_only(model)
    model.zero_grad()
    masked = _counted(model, batch)
    assert masked == pytest.approx(B * training_flops_per_sequence(dims, s, projected_share=4 / 24), rel=1e-9)
    assert masked < full


def test_formula_equals_counted_flops_with_nsp():
    conf = _tiny()
    model = AutoModelForPreTraining.from_config(conf, attn_implementation="eager")
    B, s = 2, 16
    ids = torch.randint(5, 400, (B, s), generator=torch.Generator().manual_seed(2))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
             "next_sentence_label": torch.tensor([0, 1])}
    expected = B * s * pretraining_flops_per_token(conf, s, 0.15, None, masked_only=False, nsp=True)
    assert _counted(model, batch) == pytest.approx(expected, rel=1e-9)


def test_projected_share_follows_the_collator():
    assert mlm_projected_share(128, 0.15) == 19 / 128  # round(0.15 · 126)
    assert mlm_projected_share(128, 0.15, max_predictions=20) == 19 / 128
    assert mlm_projected_share(512, 0.15, max_predictions=20) == 20 / 512  # the paper's cap binds
    assert mlm_projected_share(512, 0.15) == 76 / 512
    conf = _tiny()
    assert pretraining_flops_per_token(conf, 32, 0.15, None, masked_only=True, nsp=False) == pytest.approx(
        training_flops_per_token(Dims.of(conf), 32, 4 / 32))  # round(4.5) = 4, as in the collator
    assert pretraining_flops_per_token(conf, 32, 0.15, None, masked_only=False, nsp=False) == pytest.approx(
        training_flops_per_token(Dims.of(conf), 32, 1.0))


def test_finetuning_counts_real_lengths_pooler_and_frozen_encoder():
    conf = _tiny()
    encoder = AutoModel.from_config(conf)
    dims = Dims.of(conf)
    examples = (2, 3, 60, 10 ** 2 + 30 ** 2 + 20 ** 2)  # 2 docs: one of 10 tokens, one of 2 chunks (30 and 20)
    tokens = 60
    enc = tokens * encoder_matmul_flops(dims) + 4 * dims.layers * dims.hidden * (10 ** 2 + 30 ** 2 + 20 ** 2)
    heads = 3 * 2 * 32 * 32 + 2 * 2 * 32 * 5
    assert finetuning_flops_per_token(encoder, *examples, 5) == pytest.approx((3 * enc + 3 * heads) / tokens)
    assert finetuning_flops_per_token(encoder, *examples, 5, train_encoder=False) == pytest.approx(
        (enc + 3 * heads) / tokens)
    encoder.pooler = None  # a head that does not read the pooler
    assert finetuning_flops_per_token(encoder, *examples, 5) == pytest.approx(
        (3 * enc + 3 * 2 * 2 * 32 * 5) / tokens)
    assert finetuning_flops_per_token(encoder, 0, 0, 0, 0, 5) == 0.0


def test_mfu_in_the_metrics(tmp_path, monkeypatch):
    from trainer import tracking
    from trainer.config import WandbConfig
    monkeypatch.setattr(tracking, "peak_flops", lambda: 1e15)
    tracker = tracking.Tracker(tmp_path, True, WandbConfig(), {}, 10, 0, None, flops_per_token=2e9, world_size=4)
    record = {"step": 1, "loss": 1.0, "lr": [1e-4], "tokens_per_second": 1e6}
    tracker.log(record)
    tracker.close()
    assert record["mfu"] == pytest.approx(1e6 * 2e9 / (1e15 * 4))
