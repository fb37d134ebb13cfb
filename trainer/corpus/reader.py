"""Read prepared corpora in a global order that depends on (seed, epoch) only — never on the world size.

Position p of the infinite stream maps to (epoch, index within the epoch's permutation). Global micro-step k
covers positions [k·W·b, (k+1)·W·b); rank r reads its own contiguous b of them, so ranks are disjoint and a run
resumed on another number of ranks continues at the same global sample."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .prepare import PreparedCorpus


class GlobalOrder:
    """Mixture of corpora with weights; `weight × rows` samples of each corpus per epoch, shuffled by (seed, epoch)."""

    def __init__(self, corpora: Sequence[PreparedCorpus], weights: Sequence[float], seed: int):
        self.sizes = [c.rows for c in corpora]
        self.offsets = np.cumsum([0, *self.sizes])
        self.weights = list(weights)
        self.seed = seed
        self.counts = [max(1, int(round(w * n))) if w > 0 else 0 for w, n in zip(self.weights, self.sizes)]
        self.epoch_len = sum(self.counts)
        self._cache: tuple[int, np.ndarray] | None = None

    def epoch(self, epoch: int) -> np.ndarray:
        if self._cache is None or self._cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            parts = []
            for i, (n, count) in enumerate(zip(self.sizes, self.counts)):
                reps, extra = divmod(count, n)
                idx = [np.arange(n)] * reps
                if extra:
                    idx.append(np.sort(rng.choice(n, size=extra, replace=False)))
                parts.append(np.concatenate(idx).astype(np.int64) + self.offsets[i] if idx else np.empty(0, np.int64))
            order = np.concatenate(parts)
            rng.shuffle(order)
            self._cache = (epoch, order)
        return self._cache[1]

    def row_at(self, position: int) -> int:
        epoch, i = divmod(position, self.epoch_len)
        return int(self.epoch(epoch)[i])

    def partner_row(self, position: int, tries: int = 10) -> Optional[int]:
        """Another row for the sample at `position` (NSP negatives): a stream position of the same epoch drawn by
        an RNG seeded by (seed, position) — so the mixture weights hold and the choice depends on nothing but the
        position (not the micro-batch, not the world size) — redrawn while it maps to the sample's own row.
        None when `tries` draws found no other row (a one-row corpus)."""
        epoch, i = divmod(position, self.epoch_len)
        order = self.epoch(epoch)
        rng = np.random.default_rng([self.seed, 11, position])
        for _ in range(tries):
            other = int(order[rng.integers(self.epoch_len)])
            if other != order[i]:
                return other
        return None


class PackedDataset(torch.utils.data.Dataset):
    """Map-style view: item = global stream position → (position, token row). Shards are opened lazily
    (memory-mapped) in whichever process reads them, so no rank ever holds the corpus in RAM."""

    def __init__(self, corpora: Sequence[PreparedCorpus], order: GlobalOrder):
        self.files = [(path, rows, c.meta["dtype"], c.meta["seq_len"]) for c in corpora for path, rows in c.shards()]
        self.shard_offsets = np.cumsum([0] + [f[1] for f in self.files])
        self.order = order
        self._maps: dict[int, np.memmap] = {}

    def _shard(self, i: int) -> np.memmap:
        if i not in self._maps:
            path, rows, dtype, seq_len = self.files[i]
            self._maps[i] = np.memmap(path, dtype=dtype, mode="r", shape=(rows, seq_len))
        return self._maps[i]

    def _read(self, row: int) -> np.ndarray:
        shard = int(np.searchsorted(self.shard_offsets, row, side="right") - 1)
        return np.array(self._shard(shard)[row - self.shard_offsets[shard]], dtype=np.int64)

    def __getitem__(self, position: int):
        return position, self._read(self.order.row_at(position))

    def partner_row(self, position: int) -> Optional[np.ndarray]:
        """The token row `GlobalOrder.partner_row` picks for `position` (NSP negatives; `MLMCollator(partner=…)`)."""
        row = self.order.partner_row(position)
        return None if row is None else self._read(row)

    def __len__(self):  # the stream is infinite; DataLoader only needs this for sampler-less use
        return self.order.epoch_len

    def __getstate__(self):  # workers re-open their own maps
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state


class RankBatches(torch.utils.data.Sampler):
    """Yields, forever, this rank's micro-batch of stream positions, starting at global position `start`."""

    def __init__(self, start: int, rank: int, world_size: int, micro_batch: int):
        self.start, self.rank, self.world, self.mb = start, rank, world_size, micro_batch

    def __iter__(self) -> Iterator[list[int]]:
        step = self.world * self.mb
        base = self.start + self.rank * self.mb
        while True:
            yield list(range(base, base + self.mb))
            base += step
