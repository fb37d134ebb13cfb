"""The masked-positions-only MLM loss equals HF's full-vocabulary loss, with the same gradients."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM, AutoModelForPreTraining

from trainer.masked_head import use_masked_positions_only


def _batch(vocab: int, seed: int = 0, masked: float = 0.15):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (4, 24), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < masked, ids, torch.full_like(ids, -100))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0  # padding
    labels[1, 18:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_no_masked_position_gives_a_zero_loss_that_reaches_every_weight():
    conf = AutoConfig.for_model("bert", vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)
    model = AutoModelForMaskedLM.from_config(conf)
    use_masked_positions_only(model)
    loss = model(**_batch(300, masked=0.0)).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_pretraining_heads_keep_their_own_forward():
    conf = AutoConfig.for_model("bert", vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)
    assert not use_masked_positions_only(AutoModelForPreTraining.from_config(conf))


# every family the README lists, plus the other model types trainer/masked_head.py claims; `True`: it must take the
# masked-positions-only path, `False`: it must decline and keep HF's own forward
FAMILIES = {"bert": True, "roberta": True, "xlm-roberta": True, "camembert": True, "albert": True,
            "electra": False, "deberta-v2": False, "distilbert": False}


def _tiny_config(model_type: str):
    if model_type == "distilbert":
        return AutoConfig.for_model(model_type, vocab_size=300, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                    max_position_embeddings=64, dropout=0.0, attention_dropout=0.0)
    extra = {"embedding_size": 16} if model_type in ("electra", "albert") else {}
    return AutoConfig.for_model(model_type, vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **extra)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_every_family_either_takes_the_masked_path_exactly_or_declines(model_type):
    """Patched or not, the loss and every gradient are HF's: a family the module does not know must be left alone
    (False, no instance `forward`), never run through a head that would silently compute something else."""
    conf = _tiny_config(model_type)
    torch.manual_seed(0)
    full = AutoModelForMaskedLM.from_config(conf)
    fast = AutoModelForMaskedLM.from_config(conf)
    fast.load_state_dict(full.state_dict())
    patched = use_masked_positions_only(fast)
    assert patched is FAMILIES[model_type]
    assert ("forward" in vars(fast)) is patched  # declining leaves the class's forward in place
    batch = _batch(300)
    a, b = full(**batch).loss, fast(**batch).loss
    assert b.item() == pytest.approx(a.item(), rel=1e-5)
    a.backward()
    b.backward()
    for (name, p), q in zip(full.named_parameters(), fast.parameters()):
        if p.grad is None:
            assert q.grad is None, name
        else:
            assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name
