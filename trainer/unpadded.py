"""Unpadded (variable-length) attention for fine-tuning: `model.attn_implementation: unpadded`.

Length grouping leaves some padding in every batch, and the encoder's matmuls run over it. Unpadded, a batch's
sequences are packed back to back into one row of T = Σ lengths tokens (`Collator(unpadded=True)`: position ids
restart at each sequence, `cu_seqlens` marks the boundaries) and attention runs per sequence: on CUDA in bf16/fp16
through PyTorch's FlashAttention varlen kernel (`torch.nn.attention.varlen.varlen_attn`), elsewhere (CPU, fp32)
as one SDPA call per sequence — the same arithmetic as the padded path, so logits and loss agree (tested).

It plugs into transformers' attention interface (`AttentionInterface.register`), which BERT, RoBERTa and ELECTRA
use in transformers 5 and which forwards the extra `cu_seqlens` / `max_seqlen` arguments to it; other families
(DeBERTa's relative attention, ALBERT, DistilBERT) are refused. torch's varlen kernel has no attention dropout, so
the switch needs `attention_probs_dropout_prob: 0` (set it with `model.config`); hidden dropout is unchanged."""
from __future__ import annotations

import torch

from .errors import UserError

NAME = "bert_recipe_varlen"
SUPPORTED = ("bert", "roberta", "electra")


def varlen_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, cu_seqlens=None,
                     max_seqlen=None, **kwargs):
    """query/key/value: [1, heads, T, head_dim] of the packed row → ([1, T, heads, head_dim], None)."""
    if cu_seqlens is None:
        raise RuntimeError(f"{NAME} attention needs packed inputs (cu_seqlens); the collator did not pack this batch")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, head_dim]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        from torch.nn.attention.varlen import varlen_attn
        out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scaling)
    else:
        out = torch.empty_like(q)
        bounds = cu_seqlens.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            seg = [x[a:b].transpose(0, 1) for x in (q, k, v)]  # [heads, n, head_dim]
            out[a:b] = torch.nn.functional.scaled_dot_product_attention(*seg, scale=scaling).transpose(0, 1)
    return out.unsqueeze(0), None


def register() -> str:
    from transformers import AttentionInterface
    AttentionInterface.register(NAME, varlen_attention)
    return NAME


def check(config) -> None:
    """Refuse a model the unpadded path cannot run exactly as the padded one."""
    if config.model_type not in SUPPORTED:
        raise UserError(f"model.attn_implementation=unpadded works for {', '.join(SUPPORTED)} encoders "
                        f"(transformers' attention interface); {config.model_type} is not one — set "
                        f"model.attn_implementation=auto")
    p = getattr(config, "attention_probs_dropout_prob", 0.0)
    if p:
        raise UserError(f"model.attn_implementation=unpadded: the varlen attention kernel has no attention dropout, "
                        f"and this model has attention_probs_dropout_prob={p}; set "
                        f"model.config.attention_probs_dropout_prob=0")


def position_offset(config) -> int:
    """Where position ids start: RoBERTa-style models count from padding_idx + 1."""
    return config.pad_token_id + 1 if config.model_type == "roberta" else 0
