"""Global sample order (seed, epoch only), corpus weights, per-rank micro-batches, and the packed dataset."""
from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from trainer.corpus.prepare import PreparedCorpus
from trainer.corpus.reader import GlobalOrder, PackedDataset, RankBatches


def _fake(rows: int) -> PreparedCorpus:
    return PreparedCorpus(Path("/nonexistent"), {"rows": rows})


def test_epoch_is_permutation():
    order = GlobalOrder([_fake(100)], [1.0], seed=0)
    assert order.epoch_len == 100
    for e in range(3):
        assert sorted(order.epoch(e).tolist()) == list(range(100))
    assert order.epoch(0).tolist() != list(range(100))  # actually shuffled


def test_epochs_differ_and_seeds_differ():
    order = GlobalOrder([_fake(200)], [1.0], seed=0)
    e0, e1 = order.epoch(0).copy(), order.epoch(1).copy()
    assert not np.array_equal(e0, e1)
    assert not np.array_equal(e0, GlobalOrder([_fake(200)], [1.0], seed=1).epoch(0))


def test_order_depends_only_on_seed_and_epoch():
    a = GlobalOrder([_fake(50), _fake(30)], [1.0, 1.0], seed=3)
    b = GlobalOrder([_fake(50), _fake(30)], [1.0, 1.0], seed=3)
    a_epochs = {e: a.epoch(e).copy() for e in (0, 1, 2)}
    b_epochs = {e: b.epoch(e).copy() for e in (2, 0, 1)}  # different access order
    for e in (0, 1, 2):
        assert np.array_equal(a_epochs[e], b_epochs[e])
        assert np.array_equal(a.epoch(e), a_epochs[e])  # recomputing after the cache moved on
    # row_at walks across epochs
    n = a.epoch_len
    assert [a.row_at(p) for p in range(n, 2 * n)] == a_epochs[1].tolist()
    assert [a.row_at(p) for p in range(2 * n + 5, 2 * n + 9)] == a_epochs[2][5:9].tolist()


def test_two_corpora_offsets():
    order = GlobalOrder([_fake(10), _fake(5)], [1.0, 1.0], seed=0)
    assert order.epoch_len == 15
    assert sorted(order.epoch(0).tolist()) == list(range(15))


def test_weight_two_gives_each_row_twice():
    order = GlobalOrder([_fake(40), _fake(7)], [2.0, 1.0], seed=1)
    assert order.epoch_len == 87
    for e in (0, 1):
        c = Counter(order.epoch(e).tolist())
        assert all(c[r] == 2 for r in range(40))
        assert all(c[40 + r] == 1 for r in range(7))
        assert set(c) == set(range(47))


def test_weight_half_gives_half_without_duplicates():
    order = GlobalOrder([_fake(40), _fake(6)], [0.5, 1.0], seed=1)
    assert order.epoch_len == 26
    e0, e1 = order.epoch(0).tolist(), order.epoch(1).tolist()
    first0 = [r for r in e0 if r < 40]
    assert len(first0) == 20 and len(set(first0)) == 20
    assert sorted(r for r in e0 if r >= 40) == list(range(40, 46))
    first1 = [r for r in e1 if r < 40]
    assert len(set(first1)) == 20 and set(first1) != set(first0)  # a different half each epoch


def test_fractional_weight_above_one():
    order = GlobalOrder([_fake(10)], [1.5], seed=2)
    c = Counter(order.epoch(0).tolist())
    assert sum(c.values()) == 15 and set(c) == set(range(10))
    assert sorted(c.values()) == [1] * 5 + [2] * 5


def test_zero_weight_excludes_corpus():
    order = GlobalOrder([_fake(10), _fake(5)], [0.0, 1.0], seed=2)
    assert order.epoch_len == 5
    assert sorted(order.epoch(0).tolist()) == list(range(10, 15))


# ----------------------------------------------------------------------------- RankBatches
def _steps(start, world, mb, k):
    """positions read by every rank at global micro-steps 0..k-1: out[step][rank] = list of positions."""
    iters = [iter(RankBatches(start, r, world, mb)) for r in range(world)]
    return [[next(it) for it in iters] for _ in range(k)]


@pytest.mark.parametrize("start", [0, 13])
def test_rank_batches_partition_the_stream(start):
    mb, global_samples = 4, 4 * 6 * 5  # divisible by every world size's step
    sequences = {}
    for world in (1, 2, 3):
        k = global_samples // (world * mb)
        steps = _steps(start, world, mb, k)
        per_rank = [set(itertools.chain.from_iterable(step[r] for step in steps)) for r in range(world)]
        for a, b in itertools.combinations(per_rank, 2):
            assert not a & b, "ranks overlap"
        union = set().union(*per_rank)
        assert union == set(range(start, start + global_samples))
        assert all(len(b) == mb for step in steps for b in step)
        # read in global micro-step order (rank 0 .. W-1 within a step): the same sequence for every world size
        sequences[world] = [p for step in steps for batch in step for p in batch]
    assert sequences[1] == sequences[2] == sequences[3] == list(range(start, start + global_samples))


def test_rank_batches_resume_continues():
    # a run that stops after 3 global micro-steps at world 2 and resumes at world 3 continues at the next position
    mb = 2
    before = _steps(0, 2, mb, 3)
    consumed = sum(len(b) for step in before for b in step)
    after = _steps(consumed, 3, mb, 2)
    seq = [p for step in before + after for b in step for p in b]
    assert seq == list(range(consumed + 2 * 3 * mb))


# ----------------------------------------------------------------------------- PackedDataset
def _write_corpus(dir: Path, rows: np.ndarray, shard_rows: int, dtype="uint16") -> PreparedCorpus:
    dir.mkdir(parents=True)
    shards = []
    for i in range(0, len(rows), shard_rows):
        name = f"shard_{len(shards):05d}.bin"
        rows[i:i + shard_rows].astype(dtype).tofile(dir / name)
        shards.append([name, len(rows[i:i + shard_rows])])
    return PreparedCorpus(dir, {"rows": len(rows), "shards": shards, "dtype": dtype, "seq_len": rows.shape[1]})


def test_packed_dataset_returns_right_rows(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 60000, size=(23, 8))
    b = rng.integers(0, 60000, size=(9, 8))
    ca = _write_corpus(tmp_path / "a", a, shard_rows=5)
    cb = _write_corpus(tmp_path / "b", b, shard_rows=4, dtype="uint32")
    order = GlobalOrder([ca, cb], [1.0, 2.0], seed=4)
    ds = PackedDataset([ca, cb], order)
    assert len(ds) == 23 + 18
    allrows = np.concatenate([a, b])
    seen = Counter()
    for pos in range(2 * len(ds) + 3):
        p, row = ds[pos]
        assert p == pos and row.dtype == np.int64
        r = order.row_at(pos)
        assert np.array_equal(row, allrows[r])
        if pos < len(ds):
            seen[r] += 1
    assert all(seen[i] == 1 for i in range(23)) and all(seen[23 + i] == 2 for i in range(9))


def test_packed_dataset_pickles_without_maps(tmp_path):
    import pickle
    c = _write_corpus(tmp_path / "a", np.arange(40).reshape(10, 4), shard_rows=3)
    ds = PackedDataset([c], GlobalOrder([c], [1.0], seed=0))
    before = [ds[i][1].tolist() for i in range(10)]
    assert ds._maps
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._maps == {}
    assert [clone[i][1].tolist() for i in range(10)] == before
