"""Long-text truncation on word pieces (paper Table 2), sentence pairs, and classification batching."""
from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch

from trainer.config import TextConfig
from trainer.errors import UserError
from trainer.text import truncation
from trainer.text.batching import (Collator, epoch_global_batches, rank_eval_batches, rank_train_batches,
                                   steps_per_epoch)
from trainer.text.truncation import Encoder, pair, truncate

WORDS = ("the quick brown fox jumps over a lazy dog while seven tired students read about "
         "mountains rivers and ancient cities").split()


def long_text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n_words))


def pieces(tok, text: str) -> list[int]:
    return tok([text], add_special_tokens=False, split_special_tokens=True)["input_ids"][0]


# ----------------------------------------------------------------------------- truncate (piece ids)
@pytest.mark.parametrize("length", [0, 1, 9, 10, 11, 57])
def test_head_and_tail(length):
    ids = list(range(100, 100 + length))
    cfg = TextConfig(strategy="head", max_len=12)
    assert truncate(ids, cfg) == [ids[:10]]
    cfg = TextConfig(strategy="tail", max_len=12)
    assert truncate(ids, cfg) == [ids[-10:] if length > 10 else ids]


@pytest.mark.parametrize("head_tokens", [0, 1, 4, 9, 10])
@pytest.mark.parametrize("length", [3, 10, 11, 40])
def test_head_tail_keeps_exact_pieces(head_tokens, length):
    ids = list(range(1000, 1000 + length))
    cfg = TextConfig(strategy="head_tail", max_len=12, head_tokens=head_tokens)
    (out,) = truncate(ids, cfg)
    if length <= 10:
        assert out == ids  # short texts untouched
        return
    tail = 10 - head_tokens
    assert out == ids[:head_tokens] + (ids[length - tail:] if tail else [])
    assert len(out) == 10


@pytest.mark.parametrize("length", [0, 1, 5, 6, 7, 18, 19, 30, 31, 100])
@pytest.mark.parametrize("max_chunks", [1, 3, 5])
def test_hierarchical_chunks(length, max_chunks):
    budget = 6
    ids = list(range(7, 7 + length))
    cfg = TextConfig(strategy="hierarchical", max_len=budget + 2, max_chunks=max_chunks)
    chunks = truncate(ids, cfg)
    expected_k = min(max(1, math.ceil(length / budget)), max_chunks)
    assert len(chunks) == expected_k
    assert all(len(c) <= budget for c in chunks)
    assert [p for c in chunks for p in c] == ids[:min(length, max_chunks * budget)]


def test_pair_longest_first():
    a, b = list(range(20)), list(range(100, 103))
    ta, tb = pair(a, b, 10)
    assert tb == b and ta == a[:7]  # the short one is untouched
    ta, tb = pair(b, a, 10)
    assert ta == b and tb == a[:7]
    ta, tb = pair(list(range(30)), list(range(100, 125)), 11)
    assert ta == list(range(len(ta))) and tb == list(range(100, 100 + len(tb)))  # prefixes
    assert sorted([len(ta), len(tb)]) == [5, 6]  # both trimmed to (nearly) equal lengths
    ta, tb = pair([1, 2], [3], 10)
    assert (ta, tb) == ([1, 2], [3])


# ----------------------------------------------------------------------------- Encoder (real tokenizer)
@pytest.mark.parametrize("strategy", ["head", "tail", "head_tail", "hierarchical"])
def test_encoder_counts_special_tokens_in_budget(tiny_tokenizer, strategy):
    tok = tiny_tokenizer
    cfg = TextConfig(strategy=strategy, max_len=16, head_tokens=5, max_chunks=3)
    texts = [long_text(n, seed=n) for n in (1, 3, 10, 14, 40, 200)]
    encoded = [Encoder(tok, cfg).encode_pieces((pieces(tok, t),)) for t in texts]
    tokens, n_chunks, squares = truncation.encoded_stats([np.array([len(pieces(tok, t)) for t in texts])], cfg)
    assert tokens.tolist() == [sum(len(ids) for ids, _ in e) for e in encoded]  # what length grouping uses
    assert n_chunks.tolist() == [len(e) for e in encoded]
    assert squares.tolist() == [sum(len(ids) ** 2 for ids, _ in e) for e in encoded]
    for text, chunks in zip(texts, encoded):
        ids_all = pieces(tok, text)
        body = []
        for ids, types in chunks:
            assert len(ids) <= cfg.max_len
            assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
            assert tok.cls_token_id not in ids[1:-1] and tok.sep_token_id not in ids[1:-1]
            assert types == [0] * len(ids)
            body.append(ids[1:-1])
        budget = cfg.max_len - 2
        if strategy == "hierarchical":
            assert len(chunks) == min(max(1, math.ceil(len(ids_all) / budget)), cfg.max_chunks)
            assert [p for c in body for p in c] == ids_all[:min(len(ids_all), cfg.max_chunks * budget)]
        else:
            assert len(chunks) == 1
            expected = {"head": ids_all[:budget], "tail": ids_all[-budget:],
                        "head_tail": ids_all[:5] + ids_all[-(budget - 5):]}[strategy]
            assert body[0] == (ids_all if len(ids_all) <= budget else expected)


def test_encoder_sentence_pairs(tiny_tokenizer):
    tok = tiny_tokenizer
    cfg = TextConfig(strategy="head", max_len=20)
    examples = [(long_text(40, 1), long_text(2, 2)), (long_text(2, 3), long_text(40, 4)),
                (long_text(30, 5), long_text(30, 6)), (long_text(2, 7), long_text(3, 8))]
    encoded = [Encoder(tok, cfg).encode_pieces((pieces(tok, a), pieces(tok, b))) for a, b in examples]
    lengths = [np.array([len(pieces(tok, e[k])) for e in examples]) for k in (0, 1)]
    assert truncation.encoded_stats(lengths, cfg)[0].tolist() == [len(e[0][0]) for e in encoded]
    for (a_text, b_text), chunks in zip(examples, encoded):
        (ids, types), = chunks
        a, b = pieces(tok, a_text), pieces(tok, b_text)
        assert len(ids) == len(types) <= cfg.max_len
        first_sep = ids.index(tok.sep_token_id)
        ta, tb = ids[1:first_sep], ids[first_sep + 1:-1]
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert types == [0] * (len(ta) + 2) + [1] * (len(tb) + 1)
        assert ta == a[:len(ta)] and tb == b[:len(tb)]
        assert len(ta) + len(tb) == min(len(a) + len(b), cfg.max_len - 3)
        if len(a) + len(b) > cfg.max_len - 3:  # longest-first: the shorter one is cut only to equalise
            if len(ta) < len(a) and len(tb) < len(b):
                assert abs(len(ta) - len(tb)) <= 1
            else:
                assert min(len(a), len(b)) == (len(ta) if len(ta) == len(a) else len(tb))


def test_validate_errors():
    ok = TextConfig(strategy="head_tail", max_len=64, head_tokens=16)
    truncation.validate(ok, 1, 128)
    truncation.validate(TextConfig(strategy="head", max_len=128), 2, 128)
    with pytest.raises(UserError, match="text.strategy must be one of"):
        truncation.validate(TextConfig(strategy="middle"), 1, 512)
    with pytest.raises(UserError, match=r"text.max_len=256 exceeds the model's position limit \(128\)"):
        truncation.validate(TextConfig(max_len=256), 1, 128)
    for bad in (-1, 63, 100):
        with pytest.raises(UserError, match="text.head_tokens must be in"):
            truncation.validate(TextConfig(strategy="head_tail", max_len=64, head_tokens=bad), 1, 128)
    truncation.validate(TextConfig(strategy="head_tail", max_len=64, head_tokens=62), 1, 128)
    truncation.validate(TextConfig(strategy="head_tail", max_len=64, head_tokens=0), 1, 128)
    for strategy in ("tail", "head_tail", "hierarchical"):
        with pytest.raises(UserError, match="sentence pairs use head"):
            truncation.validate(TextConfig(strategy=strategy, max_len=64, head_tokens=16), 2, 128)
    with pytest.raises(UserError, match="text.max_chunks"):
        truncation.validate(TextConfig(strategy="hierarchical", max_len=64, max_chunks=0), 1, 128)
    with pytest.raises(UserError, match="text.max_len must be >= 4"):
        truncation.validate(TextConfig(max_len=3), 1, 128)


# ----------------------------------------------------------------------------- global batches
def _lengths(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 200, n).astype(np.int64)


@pytest.mark.parametrize("n,g", [(40, 8), (41, 8), (47, 8), (3, 8), (1000, 4), (30, 1)])
@pytest.mark.parametrize("group", [True, False])
def test_epoch_covers_every_example(n, g, group):
    lengths = _lengths(n)
    for epoch in range(2):
        batches = epoch_global_batches(lengths, g, seed=1, epoch=epoch, group_by_length=group)
        assert len(batches) == steps_per_epoch(n, g) == math.ceil(n / g)
        assert all(len(b) == g for b in batches)
        counts = Counter(np.concatenate(batches).tolist())
        assert set(counts) == set(range(n))
        # the last batch is filled up (from the start of the epoch): extra copies only to fill it
        assert sum(counts.values()) - n == (-n) % g
        if n >= g:
            assert max(counts.values()) <= 2


def test_epochs_and_seeds_differ_but_repeat():
    lengths = _lengths(100)
    a = epoch_global_batches(lengths, 8, seed=3, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, epoch_global_batches(lengths, 8, seed=3, epoch=0)))
    assert not all(np.array_equal(x, y) for x, y in zip(a, epoch_global_batches(lengths, 8, seed=3, epoch=1)))
    assert not all(np.array_equal(x, y) for x, y in zip(a, epoch_global_batches(lengths, 8, seed=4, epoch=0)))


def _padding_waste(lengths, batches) -> int:
    return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)


def test_length_grouping_reduces_padding():
    lengths = _lengths(2000, seed=5)
    grouped = epoch_global_batches(lengths, 16, seed=0, epoch=0, group_by_length=True)
    plain = epoch_global_batches(lengths, 16, seed=0, epoch=0, group_by_length=False)
    assert _padding_waste(lengths, grouped) < 0.25 * _padding_waste(lengths, plain)
    # and the batch order is still shuffled (not monotone in length)
    maxima = [int(lengths[b].max()) for b in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


@pytest.mark.parametrize("n,g", [(10, 4), (30, 8), (101, 8)])
def test_no_example_twice_in_a_global_batch_when_padding(n, g):
    lengths = _lengths(n, seed=0)
    for epoch in range(3):
        for b in epoch_global_batches(lengths, g, seed=0, epoch=epoch):
            assert len(set(b.tolist())) == len(b), b


# ----------------------------------------------------------------------------- per-rank train batches
@pytest.mark.parametrize("world", [1, 2])
def test_rank_train_batches_slice_global_batches(world):
    n, micro = 48, 4  # n divisible by the global batch: no fill-up copies
    g = micro * world
    lengths = _lengths(n, seed=2)
    per_epoch = steps_per_epoch(n, g)
    steps = 2 * per_epoch + 3  # crosses two epoch boundaries
    streams = [list(itertools.islice(rank_train_batches(lengths, micro, world, r, 9, 0), steps))
               for r in range(world)]
    expected = [b for e in range(3) for b in epoch_global_batches(lengths, g, 9, e)][:steps]
    for k in range(steps):
        parts = [streams[r][k] for r in range(world)]
        assert all(len(p) == micro for p in parts)
        joined = np.concatenate(parts)
        assert np.array_equal(joined, expected[k])
        assert len(set(joined.tolist())) == g  # ranks disjoint within the global batch
    for e in range(2):  # each epoch covers every example once across ranks
        seen = np.concatenate([streams[r][k] for r in range(world) for k in range(e * per_epoch, (e + 1) * per_epoch)])
        assert sorted(seen.tolist()) == list(range(n))


@pytest.mark.parametrize("world", [1, 2])
def test_rank_train_batches_deterministic_and_resumable(world):
    n, micro = 37, 3
    g = micro * world
    lengths = _lengths(n, seed=4)
    steps = 3 * steps_per_epoch(n, g)

    def take(rank, seed, start, count):
        return list(itertools.islice(rank_train_batches(lengths, micro, world, rank, seed, start), count))

    for rank in range(world):
        full = take(rank, 5, 0, steps)
        again = take(rank, 5, 0, steps)
        assert all(np.array_equal(x, y) for x, y in zip(full, again))
        other = take(rank, 6, 0, steps)
        assert not all(np.array_equal(x, y) for x, y in zip(full, other))
        for k in (1, steps_per_epoch(n, g) - 1, steps_per_epoch(n, g), steps_per_epoch(n, g) + 2):
            resumed = take(rank, 5, k * g, steps - k)
            assert all(np.array_equal(x, y) for x, y in zip(full[k:], resumed)), k


def test_same_global_batch_same_examples_per_step_on_any_split():
    """12 examples per optimizer step as 2x6, 1x6 with accumulation 2, 3x4 or 4x3: each step trains on the same
    set, so a run resumed on another world size (the global batch kept) continues the same epoch exactly."""
    lengths = _lengths(100, seed=7)
    steps, start = 20, 12 * 5

    def step_sets(world, micro, accum):
        streams = [rank_train_batches(lengths, micro, world, r, 3, start, accum) for r in range(world)]
        out = []
        for _ in range(steps):
            parts = [next(s) for _ in range(accum) for s in streams]
            assert all(len(p) == micro for p in parts)
            out.append(sorted(np.concatenate(parts).tolist()))
        return out

    reference = step_sets(2, 6, 1)
    assert all(len(set(s)) == 12 for s in reference)
    for world, micro, accum in ((1, 6, 2), (3, 4, 1), (4, 3, 1), (1, 12, 1), (2, 3, 2)):
        assert step_sets(world, micro, accum) == reference, (world, micro, accum)


# ----------------------------------------------------------------------------- eval batches
@pytest.mark.parametrize("n", [1, 2, 5, 64, 65, 130, 203])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 8, 64])
def test_rank_eval_batches(n, world, batch_size):
    lengths = _lengths(n, seed=n)
    per_rank = [rank_eval_batches(lengths, batch_size, world, r) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # same number of batches on every rank
    for k in range(len(per_rank[0])):
        sizes = {len(per_rank[r][k][0]) for r in range(world)} | {len(per_rank[r][k][1]) for r in range(world)}
        assert len(sizes) == 1  # same batch size on every rank
    valid = [int(i) for batches in per_rank for idx, ok in batches for i, v in zip(idx, ok) if v]
    assert sorted(valid) == list(range(n))  # every example exactly once among the valid entries
    for batches in per_rank:
        for idx, ok in batches:
            assert ((idx >= 0) & (idx < n)).all()  # padding entries still point at real examples


# ----------------------------------------------------------------------------- collator
def test_collator_pads_and_masks():
    encoded = [[([2, 10, 11, 3], [0, 0, 0, 0])],
               [([2, 12, 3, 13, 14, 3], [0, 0, 0, 1, 1, 1])],
               [([2, 3], [0, 0])]]
    batch = Collator(pad_id=0, hierarchical=False)(encoded, np.array([1, 0, 2]))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert batch["input_ids"].tolist() == [[2, 10, 11, 3, 0, 0], [2, 12, 3, 13, 14, 3], [2, 3, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0] * 6, [0, 0, 0, 1, 1, 1], [0] * 6]
    assert batch["labels"].tolist() == [1, 0, 2] and batch["labels"].dtype == torch.long


def test_collator_hierarchical_doc_index():
    encoded = [[([2, 10, 11, 3], [0] * 4), ([2, 12, 3], [0] * 3)],
               [([2, 13, 3], [0] * 3)],
               [([2, 14, 15, 16, 3], [0] * 5), ([2, 17, 3], [0] * 3), ([2, 18, 3], [0] * 3)]]
    batch = Collator(pad_id=7, hierarchical=True)(encoded, [0, 1, 0])
    assert batch["input_ids"].shape == (6, 5)
    assert batch["doc_index"].tolist() == [0, 0, 1, 2, 2, 2]
    assert batch["labels"].tolist() == [0, 1, 0]
    assert batch["input_ids"][1].tolist() == [2, 12, 3, 7, 7]
    assert batch["attention_mask"].sum(1).tolist() == [4, 3, 3, 5, 3, 3]
