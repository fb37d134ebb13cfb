"""Dynamic masked-LM collation (15 %, 80/10/10), optional whole-word masking and next-sentence prediction.

Every random choice for a sample is drawn from an RNG seeded by (seed, stream position): masks differ every
epoch (the position grows), yet are identical after a resume or on another world size. NSP negatives too: their
B segment comes from a row the reader picks for that position (`PackedDataset.partner_row`), never from the other
rows of the micro-batch."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch


def continuation_table(tokenizer) -> np.ndarray:
    """vocab-sized bool array: True where a token continues the previous word (WordPiece `##x`, or no
    leading `▁`/`Ġ` in SentencePiece/byte-BPE vocabularies)."""
    vocab = tokenizer.get_vocab()
    table = np.zeros(max(len(tokenizer), max(vocab.values()) + 1), dtype=bool)
    tokens = list(vocab)
    uses_hashes = any(t.startswith("##") for t in tokens)
    for tok, idx in vocab.items():
        if uses_hashes:
            table[idx] = tok.startswith("##")
        else:
            table[idx] = not tok.startswith(("▁", "Ġ")) and tok not in tokenizer.all_special_tokens
    return table


class MLMCollator:
    def __init__(self, tokenizer, seed: int, mlm_probability: float = 0.15, whole_word_mask: bool = False,
                 max_predictions: Optional[int] = None, nsp: bool = False,
                 partner: Optional[Callable[[int], Optional[np.ndarray]]] = None):
        """partner (needed with nsp): stream position → the token row whose tail becomes B of a negative pair, or
        None when the corpus has no other row — `PackedDataset.partner_row`, a function of the position only."""
        if nsp and partner is None:
            raise ValueError("nsp=True needs partner= (e.g. PackedDataset.partner_row) to draw negative pairs")
        self.seed, self.p, self.wwm, self.max_pred, self.nsp = seed, mlm_probability, whole_word_mask, \
            max_predictions, nsp
        self.partner = partner
        self.mask_id = tokenizer.mask_token_id
        self.pad_id, self.cls_id, self.sep_id = tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id
        self.vocab_size = len(tokenizer)
        self.special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        self.cont = continuation_table(tokenizer) if whole_word_mask else None

    def __call__(self, items):
        positions = [p for p, _ in items]
        rows = [r for _, r in items]
        rngs = [np.random.default_rng([self.seed, 7, p]) for p in positions]
        token_types = None
        nsp_labels = None
        if self.nsp:
            rows, token_types, nsp_labels = self._make_pairs(positions, rows, rngs)
        ids = np.stack(rows)
        attention = torch.from_numpy(ids != self.pad_id).long()
        labels = np.full_like(ids, -100)
        for i, rng in enumerate(rngs):
            self._mask_row(ids[i], labels[i], rng)
        batch = {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": attention,
            "labels": torch.from_numpy(labels),
            "positions": torch.tensor(positions, dtype=torch.long),
        }
        if self.nsp:
            batch["token_type_ids"] = torch.from_numpy(np.stack(token_types))
            batch["next_sentence_label"] = torch.tensor(nsp_labels, dtype=torch.long)
        return batch

    def _mask_row(self, ids: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> None:
        cand = np.flatnonzero(~np.isin(ids, self.special))
        if cand.size == 0:
            return
        n = max(1, int(round(cand.size * self.p)))
        if self.max_pred:
            n = min(n, self.max_pred)
        if self.wwm:
            chosen = self._whole_words(ids, cand, n, rng)
        else:
            chosen = rng.choice(cand, size=n, replace=False)
        labels[chosen] = ids[chosen]
        action = rng.random(chosen.size)
        ids[chosen[action < 0.8]] = self.mask_id
        rand = chosen[(action >= 0.8) & (action < 0.9)]
        ids[rand] = rng.integers(0, self.vocab_size, size=rand.size)

    def _whole_words(self, ids, cand, n, rng) -> np.ndarray:
        starts = ~self.cont[ids[cand]]
        starts[0] = True
        words = np.split(cand, np.flatnonzero(starts)[1:])
        chosen: list[int] = []
        for w in rng.permutation(len(words)):
            if len(chosen) + len(words[w]) > n:  # a hard cap, as in Google's reference: skip too-long words
                continue
            chosen.extend(words[w])
            if len(chosen) >= n:
                break
        return np.array(chosen, dtype=np.int64)

    def _body(self, row: np.ndarray) -> np.ndarray:
        return row[1:][row[1:] != self.pad_id][:-1]  # strip [CLS], padding, final [SEP]

    def _make_pairs(self, positions, rows, rngs):
        """Split each row's body into A|B. Half keep the true continuation (label 0); half (label 1) take B from
        the tail of the row `self.partner` picks for the sample's stream position: [CLS] A [SEP] B [SEP], same
        length as the input row. Cut, coin and partner depend on the position only, so a pair is the same in a
        micro-batch of one or of many, on any number of ranks."""
        seq_len = rows[0].size
        out_rows, types, labels = [], [], []
        for pos, row, rng in zip(positions, rows, rngs):
            body = self._body(row)[: seq_len - 3]
            cut = int(rng.integers(1, max(2, body.size)))
            a, b = body[:cut], body[cut:]
            label = 0
            if rng.random() < 0.5:
                other = self.partner(pos)
                other = self._body(other) if other is not None else other
                if other is not None and other.size and b.size:
                    b = other[-b.size:]
                    label = 1
            pair = np.concatenate([[self.cls_id], a, [self.sep_id], b, [self.sep_id]])
            tt = np.concatenate([np.zeros(a.size + 2, np.int64), np.ones(b.size + 1, np.int64)])
            pad = seq_len - pair.size
            out_rows.append(np.concatenate([pair, np.full(pad, self.pad_id)]).astype(np.int64))
            types.append(np.concatenate([tt, np.zeros(pad, np.int64)]))
            labels.append(label)
        return out_rows, types, labels
