"""Masked-LM loss computed on the masked positions only.

HF's `…ForMaskedLM.forward` projects every position of the batch onto the vocabulary (B x S x V logits, the
largest matmul of a BERT step) although only ~15 % of the positions carry a label. This replaces the model's
`forward` (on the instance, so DeepSpeed / DDP wrappers, ZeRO-3 hooks and `save_pretrained` are untouched) by:
encoder -> hidden states of the labelled positions -> the model's own MLM head -> cross-entropy. Same loss up to
float round-off; `bench/mlm_head_gather.py` measures the saving (its recorded result is in bench/RESULTS.md).
Models whose MLM head is not one module taking hidden states keep HF's forward."""
from __future__ import annotations

import types

import torch.nn.functional as F
from transformers.modeling_outputs import MaskedLMOutput

# model_type -> attribute of `…ForMaskedLM` holding the head that maps hidden states to vocabulary logits
_HEADS = {"bert": "cls", "roberta": "lm_head", "xlm-roberta": "lm_head", "camembert": "lm_head",
          "albert": "predictions"}


def use_masked_positions_only(model) -> bool:
    """Patch `model` (a `…ForMaskedLM`) in place; False (unchanged) when its architecture is not known here."""
    head_name = _HEADS.get(getattr(model.config, "model_type", None))
    head = getattr(model, head_name, None) if head_name else None
    if head is None or not type(model).__name__.endswith("ForMaskedLM") or model.base_model is model:
        return False
    base = model.base_model

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                      **kwargs).last_hidden_state
        picked = labels != -100
        logits = head(hidden[picked])
        if logits.numel() == 0:  # no masked position in this micro-batch: a zero that still reaches every weight
            return MaskedLMOutput(loss=hidden.sum() * 0.0 + sum(p.sum() for p in head.parameters()) * 0.0)
        return MaskedLMOutput(loss=F.cross_entropy(logits.float(), labels[picked]))

    model.forward = types.MethodType(forward, model)
    return True

