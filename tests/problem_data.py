"""Tiny multi-label and regression sets built from the topic vocabulary of tiny_data (food / sport / tech).

Multi-label: each text mixes the words of a subset of the topics (also none: filler words only), and its labels
are that subset. Regression: the target is 1.5 × the number of sport words + 0.25 — a number the text decides."""
from __future__ import annotations

import random

from tiny_data import LABELS, WORDS

SUBSETS = [["food"], ["sport", "tech"], [], ["tech"], ["food", "sport"], ["sport"], ["food", "sport", "tech"]]
FILLER = "the a of and it".split()


def multi_label_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        labels = SUBSETS[i % len(SUBSETS)]
        words = [w for lab in labels for w in WORDS[lab].split()] or FILLER
        out.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(4, 20))), "labels": labels})
    return out


def regression_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS[rng.choice(LABELS)].split()) for _ in range(rng.randint(4, 16))]
        sport = sum(w in WORDS["sport"].split() for w in words)
        out.append({"text": " ".join(words), "score": 1.5 * sport + 0.25})
    return out
