"""Masked-LM collation: rate, 80/10/10, specials, determinism per stream position, WWM, NSP."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.corpus.masking import MLMCollator, continuation_table

SEQ = 64


def _rows(tok, n, seq_len=SEQ, seed=0, pad_tail=True):
    """Rows shaped like prepared ones: [CLS] body [SEP] with an inner [SEP] (document boundary) and, on some rows,
    trailing padding."""
    rng = np.random.default_rng(seed)
    lo = max(tok.all_special_ids) + 1
    rows = []
    for i in range(n):
        body = rng.integers(lo, len(tok), size=seq_len - 2)
        body[rng.integers(5, seq_len - 8)] = tok.sep_token_id
        row = np.concatenate([[tok.cls_token_id], body, [tok.sep_token_id]]).astype(np.int64)
        if pad_tail and i % 5 == 4:
            cut = int(rng.integers(8, seq_len - 4))
            row = np.concatenate([row[:cut], [tok.sep_token_id], np.full(seq_len - cut - 1, tok.pad_token_id)])
        rows.append(row)
    return rows


def _items(rows, first_pos=0):
    return [(first_pos + i, r.copy()) for i, r in enumerate(rows)]


def test_mask_rate_and_80_10_10(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = _rows(tok, 3000)
    batch = MLMCollator(tok, seed=1)(_items(rows))
    orig = np.stack(rows)
    ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    special = np.isin(orig, tok.all_special_ids)
    masked = labels != -100
    # exact count per row: round(15 % of the row's non-special tokens)
    n_cand = (~special).sum(1)
    expected = np.maximum(1, np.round(n_cand * 0.15).astype(int))
    assert np.array_equal(masked.sum(1), expected)
    assert abs(masked.sum() / (~special).sum() - 0.15) < 0.005
    # labels hold the original token at masked positions, -100 everywhere else
    assert np.array_equal(labels[masked], orig[masked])
    assert (labels[~masked] == -100).all()
    # unmasked positions are untouched, specials never masked
    assert np.array_equal(ids[~masked], orig[~masked])
    assert not masked[special].any()
    # 80 % [MASK], 10 % random, 10 % kept
    m = ids[masked]
    o = orig[masked]
    frac_mask = (m == tok.mask_token_id).mean()
    frac_keep = (m == o).mean()
    frac_rand = ((m != o) & (m != tok.mask_token_id)).mean()
    assert abs(frac_mask - 0.8) < 0.02, frac_mask
    assert abs(frac_keep - 0.1) < 0.015, frac_keep
    assert abs(frac_rand - 0.1) < 0.015, frac_rand
    assert ids.min() >= 0 and ids.max() < len(tok)
    # masked positions spread over the whole row, not clustered
    cols = np.nonzero(masked)[1]
    assert abs((cols < SEQ // 2).mean() - 0.5) < 0.05
    # attention mask marks padding, computed from the unmasked ids
    assert np.array_equal(batch["attention_mask"].numpy(), (orig != tok.pad_token_id).astype(np.int64))
    assert batch["positions"].tolist() == list(range(3000))
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long


def test_mlm_probability_is_used(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = _rows(tok, 200, pad_tail=False)
    labels = MLMCollator(tok, seed=0, mlm_probability=0.4)(_items(rows))["labels"].numpy()
    n_cand = (~np.isin(np.stack(rows), tok.all_special_ids)).sum(1)
    assert np.array_equal((labels != -100).sum(1), np.round(n_cand * 0.4).astype(int))


def test_deterministic_per_position(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = _rows(tok, 8)
    col = MLMCollator(tok, seed=5)
    a = col(_items(rows, 100))
    b = MLMCollator(tok, seed=5)(_items(rows, 100))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the same sample at the same position gets the same mask whatever batch it is in (world-size independence)
    alone = col([(103, rows[3].copy())])
    assert torch.equal(alone["input_ids"][0], a["input_ids"][3])
    assert torch.equal(alone["labels"][0], a["labels"][3])
    reordered = col(list(reversed(_items(rows, 100))))
    assert torch.equal(reordered["labels"].flip(0), a["labels"])
    # a different position (next epoch) or seed gives a different mask
    c = col(_items(rows, 100 + 8))
    assert not torch.equal(c["labels"], a["labels"])
    d = MLMCollator(tok, seed=6)(_items(rows, 100))
    assert not torch.equal(d["labels"], a["labels"])


def test_collator_does_not_modify_input_rows(tiny_tokenizer):
    rows = _rows(tiny_tokenizer, 4)
    items = _items(rows)
    MLMCollator(tiny_tokenizer, seed=0)(items)
    for (_, r), orig in zip(items, rows):
        assert np.array_equal(r, orig)


def test_max_predictions_cap(tiny_tokenizer):
    tok = tiny_tokenizer
    rows = _rows(tok, 50)
    labels = MLMCollator(tok, seed=0, max_predictions=3)(_items(rows))["labels"].numpy()
    n_cand = (~np.isin(np.stack(rows), tok.all_special_ids)).sum(1)
    natural = np.maximum(1, np.round(n_cand * 0.15).astype(int))
    assert (natural > 3).sum() >= 30 and (natural < 3).any()
    assert np.array_equal((labels != -100).sum(1), np.minimum(natural, 3))
    # a cap above the natural count changes nothing
    a = MLMCollator(tok, seed=0, max_predictions=1000)(_items(rows))["labels"]
    b = MLMCollator(tok, seed=0)(_items(rows))["labels"]
    assert torch.equal(a, b)


def test_row_of_only_specials(tiny_tokenizer):
    tok = tiny_tokenizer
    row = np.array([tok.cls_token_id, tok.sep_token_id] + [tok.pad_token_id] * 6, dtype=np.int64)
    batch = MLMCollator(tok, seed=0)([(0, row.copy())])
    assert (batch["labels"] == -100).all()
    assert batch["input_ids"][0].tolist() == row.tolist()


# ----------------------------------------------------------------------------- whole-word masking
WWM_TEXT = ("the chef baked hello breadfoo quantumfoo in the oven goodbye "
            "the striker scored abcdefgh the penalty kick tomatoheads quickly")


def _words(ids, cont, special):
    """Independent word grouping: a word is a non-special start token plus the `##` pieces right after it."""
    words, cur = [], None
    for i, t in enumerate(ids):
        if t in special:
            cur = None
            continue
        if cont[t] and cur is not None:
            cur.append(i)
        else:
            cur = [i]
            words.append(cur)
    return words


def test_whole_word_masking(tiny_tokenizer):
    tok = tiny_tokenizer
    vocab = tok.get_vocab()
    ids = tok(WWM_TEXT, add_special_tokens=False)["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    assert sum(p.startswith("##") for p in pieces) >= 10, pieces  # the text really has multi-piece words
    cont = continuation_table(tok)
    assert cont[vocab["##o"]] and not cont[vocab["the"]] and not cont[tok.cls_token_id]
    seq = 2 + len(ids) + 1 + 5
    row = np.array([tok.cls_token_id, *ids, tok.sep_token_id, *ids[:5], tok.sep_token_id], dtype=np.int64)
    assert row.size == seq
    special = set(tok.all_special_ids)
    words = _words(row.tolist(), cont, special)
    assert max(len(w) for w in words) >= 4
    col = MLMCollator(tok, seed=3, mlm_probability=0.15, whole_word_mask=True)
    n_cand = sum(t not in special for t in row.tolist())
    target = max(1, round(n_cand * 0.15))
    masked_words_total = 0
    multi_piece_masked = 0
    for pos in range(300):
        labels = col([(pos, row.copy())])["labels"][0].numpy()
        masked = labels != -100
        assert not masked[[i for i, t in enumerate(row) if t in special]].any()
        for w in words:
            m = masked[w]
            assert m.all() or not m.any(), f"word {[pieces[i - 1] for i in w if i - 1 < len(pieces)]} partly masked"
            if m.all():
                masked_words_total += 1
                multi_piece_masked += len(w) > 1
        assert 1 <= masked.sum() <= max(target, max(len(w) for w in words))
        assert np.array_equal(labels[masked], row[masked])
    assert multi_piece_masked > 50  # multi-piece words do get masked (as a whole)


# ----------------------------------------------------------------------------- NSP
def test_nsp_pairs(tiny_tokenizer):
    tok = tiny_tokenizer
    rng = np.random.default_rng(0)
    lo = max(tok.all_special_ids) + 1
    rows = []
    for i in range(400):  # rows without inner [SEP], some padded
        body = rng.integers(lo, len(tok), size=SEQ - 2)
        n_real = SEQ - 2 if i % 3 else int(rng.integers(4, SEQ - 2))
        row = np.concatenate([[tok.cls_token_id], body[:n_real], [tok.sep_token_id],
                              np.full(SEQ - 2 - n_real, tok.pad_token_id)]).astype(np.int64)
        rows.append(row)
    partner = lambda pos: rows[(3 * pos + 1) % 400]  # never the row itself
    batch = MLMCollator(tok, seed=2, nsp=True, partner=partner)(_items(rows))
    ids, labels = batch["input_ids"].numpy(), batch["labels"].numpy()
    tt, nsp = batch["token_type_ids"].numpy(), batch["next_sentence_label"].numpy()
    assert ids.shape == tt.shape == (400, SEQ)
    assert set(nsp.tolist()) == {0, 1}
    assert 0.4 < nsp.mean() < 0.6
    unmasked = np.where(labels != -100, labels, ids)
    bodies = [r[1:][r[1:] != tok.pad_token_id][:-1] for r in rows]
    for i in range(400):
        u, t = unmasked[i], tt[i]
        real = u != tok.pad_token_id
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any()  # padding only at the end
        assert np.array_equal(batch["attention_mask"][i].numpy(), real.astype(np.int64))
        seps = np.flatnonzero(u == tok.sep_token_id)
        assert u[0] == tok.cls_token_id and len(seps) == 2 and seps[1] == n - 1
        a, b = u[1:seps[0]], u[seps[0] + 1:n - 1]
        assert a.size >= 1
        # token types: [CLS] A [SEP] → 0, B [SEP] → 1, padding → 0
        assert (t[:seps[0] + 1] == 0).all() and (t[seps[0] + 1:n] == 1).all() and (t[n:] == 0).all()
        assert not (labels[i][[0, seps[0], seps[1]]] != -100).any()  # [CLS]/[SEP] never masked
        if nsp[i] == 0:
            assert np.array_equal(np.concatenate([a, b]), bodies[i][:SEQ - 3])
        else:
            assert np.array_equal(a, bodies[i][:a.size])
            other = bodies[(3 * i + 1) % 400]
            assert b.size >= 1 and np.array_equal(b, other[-b.size:])
    assert (labels != -100).any()


def test_nsp_deterministic(tiny_tokenizer):
    rows = _rows(tiny_tokenizer, 6, pad_tail=False)
    partner = lambda pos: rows[(pos + 3) % 6]
    a = MLMCollator(tiny_tokenizer, seed=2, nsp=True, partner=partner)(_items(rows, 40))
    b = MLMCollator(tiny_tokenizer, seed=2, nsp=True, partner=partner)(_items(rows, 40))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _corpus(tmp_path, tok, n_rows, name="a", seed=0):
    """A prepared corpus on disk (one uint16 shard of `_rows`), as `prepare_corpus` writes it."""
    from trainer.corpus.prepare import PreparedCorpus
    rows = np.stack(_rows(tok, n_rows, seed=seed))
    d = tmp_path / name
    d.mkdir()
    rows.astype("uint16").tofile(d / "shard_00000.bin")
    return PreparedCorpus(d, {"rows": n_rows, "shards": [["shard_00000.bin", n_rows]], "dtype": "uint16",
                              "seq_len": SEQ}), rows


def test_nsp_needs_a_partner_source(tiny_tokenizer):
    with pytest.raises(ValueError, match="partner"):
        MLMCollator(tiny_tokenizer, seed=0, nsp=True)


def test_nsp_negatives_at_micro_batch_one(tiny_tokenizer, tmp_path):
    """A micro-batch of one row gets negatives too: B from another corpus row, picked by the reader for the
    row's stream position."""
    from trainer.corpus.reader import GlobalOrder, PackedDataset
    tok = tiny_tokenizer
    corpus, rows = _corpus(tmp_path, tok, 60)
    order = GlobalOrder([corpus], [1.0], seed=3)
    ds = PackedDataset([corpus], order)
    col = MLMCollator(tok, seed=3, nsp=True, partner=ds.partner_row)
    body = lambda r: r[1:][r[1:] != tok.pad_token_id][:-1]
    labels, partners = [], set()
    for pos in range(300):  # five epochs
        batch = col([ds[pos]])
        label = int(batch["next_sentence_label"][0])
        labels.append(label)
        ids = torch.where(batch["labels"][0] != -100, batch["labels"][0], batch["input_ids"][0]).numpy()
        n = int(batch["attention_mask"][0].sum())
        first_b = int(np.argmax(batch["token_type_ids"][0].numpy()))  # rows hold inner [SEP]s: split by type
        a, b = ids[1:first_b - 1], ids[first_b:n - 1]
        own = body(rows[order.row_at(pos)])
        assert np.array_equal(a, own[:a.size])
        if label == 0:
            assert np.array_equal(np.concatenate([a, b]), own[:SEQ - 3])
        else:
            other = order.partner_row(pos)
            assert other is not None and other != order.row_at(pos)
            assert b.size >= 1 and np.array_equal(b, body(rows[other])[-b.size:])
            assert not np.array_equal(b, own[a.size:a.size + b.size])
            partners.add(other)
    assert 0.4 < np.mean(labels) < 0.6
    assert len(partners) > 30  # drawn from across the corpus, not a fixed neighbour


def test_nsp_pairs_independent_of_micro_batch_and_world_size(tiny_tokenizer, tmp_path):
    """Every stream position gets the same (A, B, label, masks) whatever the world size and micro-batch split."""
    from trainer.corpus.reader import GlobalOrder, PackedDataset, RankBatches
    tok = tiny_tokenizer
    corpus, _ = _corpus(tmp_path, tok, 25)
    order = GlobalOrder([corpus], [1.0], seed=1)
    ds = PackedDataset([corpus], order)
    col = MLMCollator(tok, seed=1, nsp=True, partner=ds.partner_row)
    total = 48

    def run(world, mb):
        seen = {}
        for rank in range(world):
            batches = iter(RankBatches(0, rank, world, mb))
            for _ in range(total // (world * mb)):
                batch = col([ds[p] for p in next(batches)])
                for i, pos in enumerate(batch["positions"].tolist()):
                    seen[pos] = tuple(batch[k][i].tolist() for k in
                                      ("input_ids", "labels", "token_type_ids", "next_sentence_label"))
        assert sorted(seen) == list(range(total))
        return seen

    reference = run(1, 1)
    assert 0.3 < np.mean([v[3] for v in reference.values()]) < 0.7
    for world, mb in [(1, 8), (2, 3), (3, 2), (4, 1), (2, 12)]:
        assert run(world, mb) == reference, (world, mb)
    # a resumed reader (fresh objects, e.g. another process) draws the same pairs
    ds2 = PackedDataset([corpus], GlobalOrder([corpus], [1.0], seed=1))
    again = MLMCollator(tok, seed=1, nsp=True, partner=ds2.partner_row)([ds2[p] for p in range(7, 19)])
    for i, pos in enumerate(range(7, 19)):
        assert again["input_ids"][i].tolist() == reference[pos][0]
        assert int(again["next_sentence_label"][i]) == reference[pos][3]


def test_partner_rows_follow_the_mixture(tiny_tokenizer, tmp_path):
    from trainer.corpus.reader import GlobalOrder
    a, _ = _corpus(tmp_path, tiny_tokenizer, 20, "a")
    b, _ = _corpus(tmp_path, tiny_tokenizer, 10, "b", seed=1)
    off = GlobalOrder([a, b], [1.0, 0.0], seed=0)  # weight 0: b's rows are never read, nor used as negatives
    picks = [off.partner_row(p) for p in range(200)]
    assert all(r is not None and 0 <= r < 20 and r != off.row_at(p) for p, r in enumerate(picks))
    assert picks == [GlobalOrder([a, b], [1.0, 0.0], seed=0).partner_row(p) for p in range(200)]
    assert picks != [GlobalOrder([a, b], [1.0, 0.0], seed=1).partner_row(p) for p in range(200)]
    one, _ = _corpus(tmp_path, tiny_tokenizer, 1, "one")
    assert GlobalOrder([one], [1.0], seed=0).partner_row(5) is None  # no other row: the pair stays positive


def test_max_predictions_is_a_hard_cap_with_whole_word_masking(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok("hello quantumfoo breadfoo tomatoheads", add_special_tokens=False)["input_ids"]
    cont = continuation_table(tok)
    assert min(len(w) for w in _words(ids, cont, set(tok.all_special_ids))) >= 3
    row = np.array([tok.cls_token_id, *ids, tok.sep_token_id], dtype=np.int64)
    col = MLMCollator(tok, seed=0, whole_word_mask=True, max_predictions=2)
    for pos in range(20):
        labels = col([(pos, row.copy())])["labels"][0]
        assert int((labels != -100).sum()) <= 2
