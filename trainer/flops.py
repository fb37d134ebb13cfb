"""Model FLOPs per token, for the `mfu` metric: the matmuls the model really needs, counted from its config.

One formula. For a sequence of s positions through L layers of width d, feed-forward width f, embedding width e
(= d except ALBERT-style factorised embeddings) and vocabulary V, training costs

    F_seq = 3 · [ s·L·(8d² + 4·d·f + 4·s·d)       encoder: Q, K, V, O projections (4 · 2d²), FFN (2 · 2df),
                                                   attention scores Q·Kᵀ and weights·V (2 · 2sd)
                + s·2·e·d  (only when e ≠ d)       embedding projection e → d
                + m·s·(2·d·e + 2·e·V)              MLM head (transform d → e, projection e → V) on the share m
                                                   of positions that are projected onto the vocabulary
                + c·(2d² + 2·d·k) ]                pooler + k-way classifier on c pooled vectors per sequence

FLOPs; per token F_seq / s. With f = 4d, e = d and no pooled head this is the familiar
3·s·[L·(24d² + 4sd) + m·(2d² + 2dV)]. A multiply-add is 2 FLOPs, the backward pass costs twice the forward (the
3×). Not counted: embedding lookups, softmax, layer norms, activations, biases, the loss (all O(s·d) or less), and
recomputation by gradient checkpointing (MFU counts the model's FLOPs, not the hardware's).

m: the masked-LM loss of `trainer/masked_head.py` projects only the masked positions, so m is the masked share of
positions — `data.mlm_probability` of the non-special tokens, capped at `data.max_predictions` per row
(`mlm_projected_share`). HF's own `…ForMaskedLM` / `…ForPreTraining` forward (`data.nsp`, architectures the masked
head does not know) projects every position: m = 1. NSP adds c = 1 pooled vector with k = 2.

Fine-tuning (`finetuning_flops_per_token`): no MLM head (m = 0); c = 1 pooled vector per chunk (2d², when the head
reads the pooler) and a k-way classifier per document; sequences have their own lengths n, and the attention
term summed over a sequence is 4·L·n²·d, so s in it is the token-weighted mean length Σn²/Σn. A frozen encoder
(`head.freeze_encoder`) runs forward only: factor 1 instead of 3 on the encoder terms.

`tokens_per_second` counts real (non-pad) tokens, so `mfu` = flops_per_token · tokens/s ÷ (peak · GPUs) leaves
padding out of the useful work."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Dims:
    layers: int  # encoder layers executed (ALBERT: num_hidden_layers × inner_group_num, weights shared or not)
    hidden: int  # d
    intermediate: int  # f
    vocab: int = 0  # V
    embedding: int = 0  # e; 0 = hidden

    @property
    def emb(self) -> int:
        return self.embedding or self.hidden

    @classmethod
    def of(cls, config) -> "Dims":
        """From a transformers config (BERT, RoBERTa, XLM-R, ALBERT, ELECTRA, DistilBERT-style names)."""
        d = int(config.hidden_size)
        f = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim", None) or 4 * d
        layers = int(config.num_hidden_layers) * int(getattr(config, "inner_group_num", 1) or 1)
        return cls(layers, d, int(f), int(getattr(config, "vocab_size", 0) or 0),
                   int(getattr(config, "embedding_size", 0) or 0))


def encoder_matmul_flops(dims: Dims) -> float:
    """Forward FLOPs per token of the encoder's weight matmuls: L·(8d² + 4df), plus 2ed for an e → d projection.
    Equals 2 × the encoder's Linear weights applied per token."""
    d, f = dims.hidden, dims.intermediate
    proj = 2 * dims.emb * d if dims.emb != d else 0
    return float(dims.layers * (8 * d * d + 4 * d * f) + proj)


def attention_flops(dims: Dims, seq_len: float) -> float:
    """Forward FLOPs per token of the attention scores and the weighted sum over s positions: 4·L·s·d."""
    return 4.0 * dims.layers * seq_len * dims.hidden


def mlm_head_flops(dims: Dims) -> float:
    """Forward FLOPs per projected position of the MLM head: transform d → e and projection e → V."""
    return 2.0 * dims.hidden * dims.emb + 2.0 * dims.emb * dims.vocab


def pooled_head_flops(dims: Dims, outputs: int) -> float:
    """Forward FLOPs per pooled vector: pooler d → d and a classifier d → k."""
    return 2.0 * dims.hidden * dims.hidden + 2.0 * dims.hidden * outputs


def training_flops_per_sequence(dims: Dims, seq_len: float, projected_share: float = 0.0, pooled: float = 0.0,
                                pooled_outputs: int = 0, train_encoder: bool = True) -> float:
    """F_seq of the module docstring (forward + backward)."""
    encoder = seq_len * (encoder_matmul_flops(dims) + attention_flops(dims, seq_len))
    heads = seq_len * projected_share * mlm_head_flops(dims) + pooled * pooled_head_flops(dims, pooled_outputs)
    return (3.0 if train_encoder else 1.0) * encoder + 3.0 * heads


def training_flops_per_token(dims: Dims, seq_len: float, projected_share: float = 0.0, pooled: float = 0.0,
                             pooled_outputs: int = 0, train_encoder: bool = True) -> float:
    return training_flops_per_sequence(dims, seq_len, projected_share, pooled, pooled_outputs,
                                       train_encoder) / seq_len


def mlm_projected_share(seq_len: int, mlm_probability: float, max_predictions: Optional[int] = None) -> float:
    """m for a packed row of `seq_len` positions ([CLS] … [SEP]): round(p · (s − 2)) masked, at least one, at most
    `max_predictions` (what `MLMCollator` draws), as a share of the s positions."""
    n = max(1, round(mlm_probability * (seq_len - 2)))
    if max_predictions:
        n = min(n, max_predictions)
    return n / seq_len


def pretraining_flops_per_token(config, seq_len: int, mlm_probability: float, max_predictions: Optional[int],
                                masked_only: bool, nsp: bool) -> float:
    """Masked-LM (+ NSP) pre-training. masked_only: the loss projects only the masked positions
    (`use_masked_positions_only` returned True); otherwise HF's head projects all of them (m = 1)."""
    m = mlm_projected_share(seq_len, mlm_probability, max_predictions) if masked_only else 1.0
    return training_flops_per_token(Dims.of(config), seq_len, m, pooled=1 if nsp else 0, pooled_outputs=2)


def finetuning_flops_per_token(encoder, docs: int, chunks: int, tokens: int, squares: int, num_labels: int,
                               train_encoder: bool = True) -> float:
    """Sequence classification with `encoder` (an HF base model; its pooler, when it kept one, counts) over
    `docs` examples fed as `chunks` sequences (a hierarchical document has several) of `tokens` real tokens in
    all, `squares` = Σ sequence length², per real token."""
    dims = Dims.of(encoder.config)
    pooler = getattr(encoder, "pooler", None) is not None
    if not tokens:
        return 0.0
    s = squares / tokens  # token-weighted mean length: Σ_sequences n · 4Ln·d = tokens · 4L·(Σn²/Σn)·d
    encoder = tokens * (encoder_matmul_flops(dims) + attention_flops(dims, s))
    heads = (chunks * 2.0 * dims.hidden * dims.hidden if pooler else 0.0) + docs * 2.0 * dims.hidden * num_labels
    return ((3.0 if train_encoder else 1.0) * encoder + 3.0 * heads) / tokens
