"""Layer-wise decayed learning rates (paper Table 4) and the parameter groups built from them."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from trainer.classifier import Classifier
from trainer.config import HeadConfig, TextConfig
from trainer.optim.layer_decay import layer_decay_scales, parameter_depths
from trainer.optim.param_groups import build_param_groups, describe_groups, make_optimizer

L = 4
XI = 0.8
LR = 1e-3
WD = 0.01


def _bert(**kw):
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=L, num_attention_heads=2,
                                intermediate_size=48, max_position_embeddings=64, **kw))


def _roberta():
    from transformers import RobertaConfig, RobertaModel
    return RobertaModel(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=L, num_attention_heads=2,
                                      intermediate_size=48, max_position_embeddings=66, pad_token_id=1))


def _distilbert():
    from transformers import DistilBertConfig, DistilBertModel
    return DistilBertModel(DistilBertConfig(vocab_size=100, dim=32, n_layers=L, n_heads=2, hidden_dim=48,
                                            max_position_embeddings=64))


def _electra(embedding_size=32):
    from transformers import ElectraConfig, ElectraModel
    return ElectraModel(ElectraConfig(vocab_size=100, embedding_size=embedding_size, hidden_size=32,
                                      num_hidden_layers=L, num_attention_heads=2, intermediate_size=48,
                                      max_position_embeddings=64))


def _deberta_v2():
    from transformers import DebertaV2Config, DebertaV2Model
    return DebertaV2Model(DebertaV2Config(vocab_size=100, hidden_size=32, num_hidden_layers=L, num_attention_heads=2,
                                          intermediate_size=48, max_position_embeddings=64, relative_attention=True,
                                          position_buckets=8, norm_rel_ebd="layer_norm", pos_att_type=["p2c", "c2p"]))


ENCODERS = {"bert": _bert, "roberta": _roberta, "distilbert": _distilbert, "electra": _electra}
# where each architecture keeps its embeddings and its blocks (names differ; the code must not rely on them)
BLOCK_RE = re.compile(r"^encoder\.(?:encoder\.layer|transformer\.layer)\.(\d+)\.")


def classifier_over(make_encoder, head: HeadConfig = None) -> Classifier:
    torch.manual_seed(0)
    return Classifier(make_encoder(), 3, head or HeadConfig(layers=-1), TextConfig(max_len=32))


def expected_depth(name: str) -> int:
    if name.startswith("encoder.embeddings."):
        return 0
    m = BLOCK_RE.match(name)
    if m:
        return int(m.group(1)) + 1
    assert name.startswith(("encoder.pooler.", "heads.")), name
    return L + 1


@pytest.mark.parametrize("arch", sorted(ENCODERS))
def test_depths_and_scales(arch):
    model = classifier_over(ENCODERS[arch])
    depths, num_layers = parameter_depths(model, model.encoder)
    assert num_layers == L
    assert set(depths) == {n for n, _ in model.named_parameters()}
    for name, depth in depths.items():
        assert depth == expected_depth(name), name
    assert {d for d in depths.values()} == set(range(L + 2))  # every level holds parameters
    scale, part = layer_decay_scales(model, model.encoder, XI)
    for name in depths:
        d = expected_depth(name)
        if d == 0:
            assert scale(name) == pytest.approx(XI ** L) and part(name) == "embeddings"
        elif d <= L:
            assert scale(name) == pytest.approx(XI ** (L - d)) and part(name) == f"layer_{d}"
        else:
            assert scale(name) == 1.0 and part(name) == "head"
    assert scale("heads.default.classifier.weight") == 1.0
    if arch in ("bert", "roberta"):  # (ELECTRA and DistilBERT have no pooler)
        assert scale("encoder.pooler.dense.weight") == 1.0


@pytest.mark.parametrize("arch", [
    "electra_projected",
    "deberta_v2",
])
def test_no_encoder_parameter_is_treated_as_head(arch):
    make = {"electra_projected": lambda: _electra(embedding_size=16), "deberta_v2": _deberta_v2}[arch]
    model = classifier_over(make, HeadConfig(layers=-1, pooler=False))
    depths, num_layers = parameter_depths(model, model.encoder)
    above = sorted(n for n, d in depths.items() if d > num_layers and n.startswith("encoder."))
    assert above == []


def _norm_or_bias(model: nn.Module) -> set[str]:
    out = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            if isinstance(module, nn.LayerNorm) or p_name == "bias":
                out.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return out


@pytest.mark.parametrize("arch", sorted(ENCODERS))
@pytest.mark.parametrize("xi", [XI, 1.0])
def test_param_groups_with_layer_decay(arch, xi):
    model = classifier_over(ENCODERS[arch])
    scale, part = layer_decay_scales(model, model.encoder, xi)
    groups = build_param_groups(model, LR, WD, lr_scale=scale, part=part)
    assert groups and all(g["params"] for g in groups)
    keys = [(round(g["lr"], 15), g["weight_decay"]) for g in groups]
    assert len(keys) == len(set(keys))  # equal (lr, wd) merged
    # distinct scales: ξ^L … ξ^1 for embeddings … layer L-1, and 1 shared by layer L and the head
    n_levels = L + 1 if xi < 1 else 1
    assert len(groups) == 2 * n_levels
    no_decay = _norm_or_bias(model)
    named = dict(model.named_parameters())
    seen = []
    for g in groups:
        assert len(g["params"]) == len(g["names"])
        for name, p in zip(g["names"], g["params"]):
            assert named[name] is p
            assert g["lr"] == pytest.approx(LR * scale(name))
            assert g["weight_decay"] == (0.0 if name in no_decay else WD), name
            assert part(name) in g["parts"]
        assert set(g["parts"]) == {part(n) for n in g["names"]}
        seen += g["names"]
    assert sorted(seen) == sorted(named)  # every trainable parameter exactly once
    if xi < 1:
        top = [g for g in groups if g["lr"] == pytest.approx(LR)]
        assert all(g["parts"] == [f"layer_{L}", "head"] for g in top)
        emb = [g for g in groups if g["lr"] == pytest.approx(LR * xi ** L)]
        assert len(emb) == 2 and all(g["parts"] == ["embeddings"] for g in emb)
    opt = make_optimizer(groups, [0.9, 0.999], 1e-6)
    assert [pg["lr"] for pg in opt.param_groups] == [g["lr"] for g in groups]
    assert [pg["weight_decay"] for pg in opt.param_groups] == [g["weight_decay"] for g in groups]


@pytest.mark.parametrize("freeze", [False, True])
def test_describe_groups_sizes_add_up(freeze):
    model = classifier_over(_bert, HeadConfig(layers="last4", layer_pool="concat", freeze_encoder=freeze))
    scale, part = layer_decay_scales(model, model.encoder, XI)
    groups = build_param_groups(model, LR, WD, lr_scale=scale, part=part)
    report = describe_groups(groups)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [r["index"] for r in report] == list(range(len(groups)))
    assert sum(r["num_params"] for r in report) == sum(p.numel() for _, p in trainable)
    assert sum(r["num_tensors"] for r in report) == len(trainable)
    assert sorted(n for r in report for n in r["names"]) == sorted(n for n, _ in trainable)
    for r, g in zip(report, groups):
        assert (r["lr"], r["weight_decay"], r["parts"]) == (g["lr"], g["weight_decay"], g["parts"])
    if freeze:
        assert {p for r in report for p in r["parts"]} == {"head"}
        assert len(report) == 2  # classifier weight (decayed) and bias (not)
    import json
    json.dumps(report)  # what param_groups.json holds must serialise


def _albert():
    from transformers import AlbertConfig, AlbertModel
    return AlbertModel(AlbertConfig(vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=L,
                                    num_attention_heads=2, intermediate_size=48, max_position_embeddings=64))


def test_albert_shared_block_is_one_depth():
    """ALBERT applies one shared block L times: that block is depth 1 of 1 (lr·ξ⁰), the embeddings and the
    embedding projection lr·ξ, pooler and head the base lr."""
    model = classifier_over(_albert)
    depths, num_layers = parameter_depths(model, model.encoder)
    assert num_layers == 1
    for name, depth in depths.items():
        if ".albert_layer_groups.0." in name:
            assert depth == 1, name
        elif name.startswith(("encoder.embeddings.", "encoder.encoder.embedding_hidden_mapping_in.")):
            assert depth == 0, name
        else:
            assert name.startswith(("encoder.pooler.", "heads.")) and depth == 2, name
    scale, _ = layer_decay_scales(model, model.encoder, XI)
    assert scale("encoder.embeddings.word_embeddings.weight") == pytest.approx(XI)
    assert scale("encoder.encoder.albert_layer_groups.0.albert_layers.0.ffn.weight") == 1.0
