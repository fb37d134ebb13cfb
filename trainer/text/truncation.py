"""Long-text strategies on word pieces (paper Table 2). `max_len` counts [CLS] and [SEP].

head: first max_len−2 · tail: last max_len−2 · head_tail: first `head_tokens` + last (max_len−2−head_tokens) ·
hierarchical: k = ⌈L/(max_len−2)⌉ chunks (at most `max_chunks`), each its own [CLS] … [SEP] input."""
from __future__ import annotations

import numpy as np

from ..config import TextConfig
from ..errors import UserError

STRATEGIES = ("head", "tail", "head_tail", "hierarchical")


def validate(cfg: TextConfig, n_fields: int, model_max_len: int) -> None:
    if cfg.strategy not in STRATEGIES:
        raise UserError(f"text.strategy must be one of {', '.join(STRATEGIES)}; got {cfg.strategy!r}")
    if cfg.max_len < 4:
        raise UserError(f"text.max_len must be >= 4, got {cfg.max_len}")
    if cfg.max_len > model_max_len:
        raise UserError(f"text.max_len={cfg.max_len} exceeds the model's position limit ({model_max_len})")
    if cfg.strategy == "head_tail" and not 0 <= cfg.head_tokens <= cfg.max_len - 2:
        raise UserError(f"text.head_tokens must be in [0, max_len-2={cfg.max_len - 2}], got {cfg.head_tokens}")
    if cfg.strategy == "hierarchical" and cfg.max_chunks < 1:
        raise UserError(f"text.max_chunks must be >= 1, got {cfg.max_chunks}")
    if n_fields == 2 and cfg.strategy != "head":
        raise UserError(f"text.strategy={cfg.strategy} works on one text field; sentence pairs use head")


def truncate(ids: list[int], cfg: TextConfig) -> list[list[int]]:
    """Body pieces (no special tokens) of one text: one piece, or several for hierarchical."""
    budget = cfg.max_len - 2
    if cfg.strategy == "hierarchical":
        chunks = [ids[i:i + budget] for i in range(0, max(len(ids), 1), budget)]
        return chunks[:cfg.max_chunks]
    if len(ids) <= budget:
        return [ids]
    if cfg.strategy == "head":
        return [ids[:budget]]
    if cfg.strategy == "tail":
        return [ids[-budget:]]
    tail = budget - cfg.head_tokens
    return [ids[:cfg.head_tokens] + (ids[-tail:] if tail else [])]


def pair(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Longest-first truncation of a sentence pair to `budget` pieces together."""
    a, b = list(a), list(b)
    while len(a) + len(b) > budget:
        (a if len(a) >= len(b) else b).pop()
    return a, b


def encoded_stats(piece_lengths: list, cfg: TextConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per example, from the stored piece counts of its field(s) alone (no pieces read): (tokens the encoder
    sees, [CLS]/[SEP] included; chunks; Σ chunk length²) — length grouping and the FLOPs count use them."""
    budget = cfg.max_len - 2
    if len(piece_lengths) == 2:
        n = np.minimum(piece_lengths[0] + piece_lengths[1], cfg.max_len - 3) + 3
        return n, np.ones_like(n), n * n
    length = piece_lengths[0]
    if cfg.strategy != "hierarchical":
        n = np.minimum(length, budget) + 2
        return n, np.ones_like(n), n * n
    chunks = np.minimum(np.maximum(-(-length // budget), 1), cfg.max_chunks)
    last = np.minimum(length, chunks * budget) - (chunks - 1) * budget + 2
    return (chunks - 1) * (budget + 2) + last, chunks, (chunks - 1) * (budget + 2) ** 2 + last * last


class Encoder:
    """Word pieces of an example's field(s) → model inputs (input_ids, token_type_ids) with [CLS]/[SEP], per the
    strategy: one chunk, or several for hierarchical."""

    def __init__(self, tokenizer, cfg: TextConfig):
        self.cfg = cfg
        self.cls, self.sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        if self.cls is None or self.sep is None:
            raise UserError("the tokenizer needs [CLS] and [SEP] tokens")

    def encode_pieces(self, pieces: tuple) -> list[tuple[list[int], list[int]]]:
        if len(pieces) == 2:
            a, b = pair(pieces[0], pieces[1], self.cfg.max_len - 3)
            return [([self.cls, *a, self.sep, *b, self.sep], [0] * (len(a) + 2) + [1] * (len(b) + 1))]
        return [([self.cls, *p, self.sep], [0] * (len(p) + 2)) for p in truncate(pieces[0], self.cfg)]
