"""Classifier head: layer choice (paper Table 3), chunk pooling (Table 2 hierarchical), freezing, export/load."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from trainer.classifier import Classifier, pool_chunks, resolve_layers
from trainer.config import HeadConfig, TextConfig
from trainer.errors import UserError

L = 4
HIDDEN = 32


def tiny_bert(seed: int = 0, **kw):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    conf = BertConfig(vocab_size=120, hidden_size=HIDDEN, num_hidden_layers=L, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64, **kw)
    return BertModel(conf).eval()


def make(head: HeadConfig = None, text: TextConfig = None, num_labels: int = 3, seed: int = 0) -> Classifier:
    model = Classifier(tiny_bert(seed), num_labels, head or HeadConfig(), text or TextConfig(max_len=32))
    torch.manual_seed(seed + 1)
    for lin in (model.classifier, model.chunk_scorer):  # non-zero head so differences show in the logits
        if lin is not None:
            nn.init.normal_(lin.weight, std=0.5)
            nn.init.normal_(lin.bias, std=0.5)
    return model.eval()


def inputs(batch: int = 3, seq: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (batch, seq), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[0, seq // 2:] = 0
    types = torch.zeros_like(ids)
    types[:, seq // 2:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


# ----------------------------------------------------------------------------- resolve_layers
def test_resolve_layers():
    assert resolve_layers(0, 12) == [0]
    assert resolve_layers(12, 12) == [12]
    assert resolve_layers(-1, 12) == [12]
    assert resolve_layers(-13, 12) == [0]
    assert resolve_layers([0, -1, 5], 12) == [0, 12, 5]
    assert resolve_layers("first4", 12) == [1, 2, 3, 4]
    assert resolve_layers("last4", 12) == [9, 10, 11, 12]
    assert resolve_layers("all", 12) == list(range(1, 13))
    assert resolve_layers("last4", 4) == [1, 2, 3, 4]
    for bad in (13, -14, 99, [1, 13], [], "middle", [1.5], ["1"]):
        with pytest.raises(UserError, match="head.layers"):
            resolve_layers(bad, 12)


# ----------------------------------------------------------------------------- pool_chunks
def naive_pool(features, doc_index, num_docs, mode, scorer=None):
    out = []
    for d in range(num_docs):
        f = features[doc_index == d]
        if mode == "mean":
            out.append(f.mean(0))
        elif mode == "max":
            out.append(f.max(0).values)
        else:
            w = torch.softmax(scorer(f).squeeze(-1), 0)
            out.append((w.unsqueeze(-1) * f).sum(0))
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["mean", "max", "attention"])
def test_pool_chunks_matches_naive_loop(mode):
    torch.manual_seed(0)
    counts = [3, 1, 5, 2]  # uneven, one document with a single chunk
    doc_index = torch.tensor([d for d, c in enumerate(counts) for _ in range(c)])
    doc_index = doc_index[torch.randperm(len(doc_index))]  # chunks need not be contiguous
    feats = torch.randn(len(doc_index), 7) * 3
    scorer = nn.Linear(7, 1) if mode == "attention" else None
    got = pool_chunks(feats, doc_index, len(counts), mode, scorer)
    want = naive_pool(feats, doc_index, len(counts), mode, scorer)
    assert got.shape == (len(counts), 7)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], feats[doc_index == 1][0])  # one chunk → that chunk


def test_attention_weights_sum_to_one_per_document():
    torch.manual_seed(1)
    counts = [4, 1, 2, 6]
    doc_index = torch.tensor([d for d, c in enumerate(counts) for _ in range(c)])
    scorer = _ScoreFrom(nn.Linear(5, 1), torch.randn(len(doc_index), 5) * 4)  # non-trivial scores
    # pooling all-ones features gives, per document, the sum of its chunk weights
    pooled = pool_chunks(torch.ones(len(doc_index), 3), doc_index, len(counts), "attention", scorer)
    torch.testing.assert_close(pooled, torch.ones(len(counts), 3))
    # and each weight is the softmax of the document's own scores
    feats = torch.eye(len(doc_index))  # one-hot features: the pooled row is the weight vector
    weights = pool_chunks(feats, doc_index, len(counts), "attention", scorer)
    scores = scorer(None).squeeze(-1)
    for d in range(len(counts)):
        sel = doc_index == d
        torch.testing.assert_close(weights[d][sel], torch.softmax(scores[sel], 0))
        assert torch.all(weights[d][~sel] == 0)


class _ScoreFrom(nn.Module):
    """A scorer that ignores its input and scores the chunks of a fixed feature matrix."""

    def __init__(self, lin, feats):
        super().__init__()
        self.lin, self.feats = lin, feats

    def forward(self, _):
        return self.lin(self.feats)


# ----------------------------------------------------------------------------- Classifier
@pytest.mark.parametrize("layers,pool,width", [
    (-1, "concat", HIDDEN), (2, "concat", HIDDEN), (0, "concat", HIDDEN),
    ([1, 2, 3], "concat", 3 * HIDDEN), ("last4", "concat", 4 * HIDDEN), ("all", "mean", HIDDEN),
    ([0, 4], "max", HIDDEN), ("first4", "mean", HIDDEN)])
def test_output_shapes_and_feature_width(layers, pool, width):
    model = make(HeadConfig(layers=layers, layer_pool=pool))
    assert model.classifier.in_features == width
    x = inputs()
    assert model.features(**x).shape == (3, width)
    loss, logits = model(**x, labels=torch.tensor([0, 1, 2]))
    assert logits.shape == (3, 3) and loss.ndim == 0 and torch.isfinite(loss)
    _, logits = model(**x)
    assert logits.shape == (3, 3)


def test_layer_features_are_the_cls_hidden_states():
    model = make(HeadConfig(layers=[0, 2, 4], layer_pool="concat"))
    x = inputs()
    with torch.no_grad():
        ref = model.encoder(**x, output_hidden_states=True).hidden_states
        feats = model.features(**x)
    assert len(ref) == L + 1
    torch.testing.assert_close(feats[:, :HIDDEN], ref[0][:, 0])  # layer 0 = embeddings output
    torch.testing.assert_close(feats[:, HIDDEN:2 * HIDDEN], ref[2][:, 0])
    torch.testing.assert_close(feats[:, 2 * HIDDEN:], ref[4][:, 0])
    for pool, reduce in (("mean", lambda s: s.mean(0)), ("max", lambda s: s.max(0).values)):
        m = make(HeadConfig(layers=[0, 2, 4], layer_pool=pool))
        with torch.no_grad():
            stacked = torch.stack([h[:, 0] for h in m.encoder(**x, output_hidden_states=True).hidden_states])
            torch.testing.assert_close(m.features(**x), reduce(stacked[[0, 2, 4]]))
    single0 = make(HeadConfig(layers=0))
    with torch.no_grad():
        torch.testing.assert_close(single0.features(**x),
                                   single0.encoder(**x, output_hidden_states=True).hidden_states[0][:, 0])


def test_pooler_only_for_last_layer_alone():
    x = inputs()
    for layers in (-1, L, [L], [-1]):
        model = make(HeadConfig(layers=layers))
        assert model.use_pooler and model.encoder.pooler is not None
        with torch.no_grad():
            torch.testing.assert_close(model.features(**x), model.encoder(**x).pooler_output)
    no_pool = make(HeadConfig(layers=-1, pooler=False))
    assert not no_pool.use_pooler and no_pool.encoder.pooler is None
    with torch.no_grad():
        torch.testing.assert_close(no_pool.features(**x), no_pool.encoder(**x).last_hidden_state[:, 0])
    for layers in (2, [3, 4], "last4", 0):
        model = make(HeadConfig(layers=layers))
        assert not model.use_pooler and model.encoder.pooler is None
        assert not any("pooler" in n for n, _ in model.named_parameters())


def test_freeze_encoder_trains_head_only():
    model = make(HeadConfig(freeze_encoder=True), TextConfig(strategy="hierarchical", max_len=32,
                                                             chunk_pool="attention"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("heads.default.classifier.", "heads.default.chunk_scorer.")) for n in trainable)
    assert {n.split(".")[2] for n in trainable} == {"classifier", "chunk_scorer"}
    model.train()
    x = inputs()
    loss, _ = model(**x, labels=torch.tensor([0, 1, 2]), doc_index=torch.tensor([0, 1, 2]))
    loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert model.classifier.weight.grad is not None


def test_hierarchical_forward_pools_chunks_per_document():
    model = make(HeadConfig(layers=-1), TextConfig(strategy="hierarchical", max_len=32, chunk_pool="mean"))
    x = inputs(batch=5)
    doc_index = torch.tensor([0, 0, 1, 2, 2])
    loss, logits = model(**x, labels=torch.tensor([0, 1, 2]), doc_index=doc_index)
    assert logits.shape == (3, 3)
    with torch.no_grad():
        feats = model.features(**x)
        want = model.classifier(torch.stack([feats[:2].mean(0), feats[2], feats[3:].mean(0)]))
    torch.testing.assert_close(logits, want)


# ----------------------------------------------------------------------------- export / load
def _logits(model, x, doc_index=None):
    with torch.no_grad():
        return model.eval()(**x, doc_index=doc_index)[1]


def test_standard_head_exports_as_hf_sequence_classification(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForSequenceClassification
    model = make(HeadConfig(layers=-1), TextConfig(strategy="head", max_len=32))
    assert model.is_standard()
    x = inputs()
    before = _logits(model, x)
    labels = ["neg", "neu", "pos"]
    model.save(tmp_path / "m", model.state_dict(), tiny_tokenizer, labels, ["text"])
    loaded, recipe = Classifier.from_pretrained(tmp_path / "m")
    assert recipe["format"] == "hf" and recipe["labels"] == labels
    torch.testing.assert_close(_logits(loaded, x), before)
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "m")).eval()
    assert type(hf).__name__ == "BertForSequenceClassification"
    assert hf.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    with torch.no_grad():
        torch.testing.assert_close(hf(**x).logits, before)


def test_nonstandard_head_exports_in_project_format(tmp_path, tiny_tokenizer):
    head = HeadConfig(layers="last4", layer_pool="concat")
    text = TextConfig(strategy="hierarchical", max_len=32, max_chunks=3, chunk_pool="attention")
    model = make(head, text)
    assert not model.is_standard() and model.chunk_scorer is not None
    x = inputs(batch=5)
    doc_index = torch.tensor([0, 1, 1, 1, 2])
    before = _logits(model, x, doc_index)
    model.save(tmp_path / "m", model.state_dict(), tiny_tokenizer, [0, 1, 7], ["text"])
    loaded, recipe = Classifier.from_pretrained(tmp_path / "m")
    assert recipe["format"] == "recipe" and recipe["labels"] == [0, 1, 7]
    assert loaded.layers == model.layers and loaded.hierarchical and loaded.text_cfg.chunk_pool == "attention"
    torch.testing.assert_close(_logits(loaded, x, doc_index), before)


def test_from_pretrained_refuses_foreign_dir(tmp_path):
    with pytest.raises(UserError, match="not a model exported by this trainer"):
        Classifier.from_pretrained(tmp_path)
