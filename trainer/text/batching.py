"""Length-grouped, dynamically padded batches for classification — identical on every rank, sliced per rank.

Train: each epoch is a (seed, epoch) permutation cut into mega-batches of 50 global batches; inside one, examples
are sorted by length and cut into global batches whose order is shuffled again. Global batch k is split into one
micro-batch per rank and accumulation micro-step, so all ranks run the same number of steps (ZeRO-3 needs it) on
disjoint examples; the last global batch is filled up from the start of the epoch. Hierarchical examples
contribute several chunks; the encoder sees them flattened as one [chunks, T] tensor with a chunk → document index."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch

MEGA = 50


def epoch_global_batches(lengths: np.ndarray, global_batch: int, seed: int, epoch: int,
                         group_by_length: bool = True) -> np.ndarray:
    """The epoch's global batches as rows of one (batches, global_batch) int32 array — no Python object per
    batch or example, so memory stays flat in the dataset size."""
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch, 17])
    order = rng.permutation(n).astype(np.int32)
    if group_by_length:
        mega = global_batch * MEGA
        for i in range(0, n, mega):  # in place, one mega-batch at a time
            part = order[i:i + mega]
            part[:] = part[np.argsort(-lengths[part], kind="stable")]
    short = -n % global_batch
    if short:  # fill the last batch with examples it does not hold yet (repeats only if n < global batch)
        last = order[n - (n % global_batch):]
        others = order[~np.isin(order, last)][:short]
        order = np.concatenate([order, np.resize(np.concatenate([last, others]), global_batch)[len(last):]])
    batches = order.reshape(-1, global_batch)
    return batches[rng.permutation(len(batches))]


def steps_per_epoch(n: int, global_batch: int) -> int:
    return math.ceil(n / global_batch)


def rank_train_batches(lengths, micro_batch: int, world: int, rank: int, seed: int, start_sample: int,
                       grad_accum: int = 1) -> Iterator[np.ndarray]:
    """This rank's micro-batches (example indexes), forever, from global sample `start_sample` on.

    The grouping unit is the optimizer step's global batch (micro x world x accumulation), cut into `grad_accum`
    micro-steps of one micro-batch per rank: a run resumed on another world size with the same global batch
    trains every optimizer step on the same examples."""
    g = micro_batch * world * grad_accum
    per_epoch = steps_per_epoch(len(lengths), g)
    step = start_sample // g
    while True:
        epoch, k = divmod(step, per_epoch)
        for batch in epoch_global_batches(lengths, g, seed, epoch)[k:]:
            for a in range(grad_accum):
                first = (a * world + rank) * micro_batch
                yield batch[first:first + micro_batch]
            step += 1


def rank_eval_batches(lengths, batch_size: int, world: int, rank: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Length-sorted (indexes, valid mask) batches; every rank gets the same number of equally sized batches."""
    order = np.argsort(-lengths, kind="stable")
    per_rank = math.ceil(len(order) / world)
    n_batches = math.ceil(per_rank / batch_size)
    out = []
    for b in range(n_batches):
        pos = np.arange(b * batch_size * world, min((b + 1) * batch_size * world, n_batches * batch_size * world))
        pos = pos[rank::world]
        valid = pos < len(order)
        out.append((order[np.where(valid, pos, 0)], valid))
    return out


class Collator:
    """Pads a list of encoded examples; hierarchical examples flatten into chunks + `doc_index`.

    unpadded (`model.attn_implementation: unpadded`): no padding at all — the chunks back to back in one row, with
    position ids restarting at each (from `position_offset`) and `cu_seqlens` / `max_seqlen` for the attention."""

    def __init__(self, pad_id: int, hierarchical: bool, unpadded: bool = False, position_offset: int = 0):
        self.pad_id, self.hierarchical = pad_id, hierarchical
        self.unpadded, self.position_offset = unpadded, position_offset

    def __call__(self, encoded: list, labels=None) -> dict:
        """`labels`: the examples' targets (class ids → long; multi-hot rows or values → float32), or None."""
        chunks, doc_index = [], []
        for d, example in enumerate(encoded):
            chunks.extend(example)
            doc_index.extend([d] * len(example))
        if self.unpadded:
            lengths = [len(x) for x, _ in chunks]
            batch = {"input_ids": torch.tensor([t for x, _ in chunks for t in x]).unsqueeze(0),
                     "token_type_ids": torch.tensor([t for _, ty in chunks for t in ty]).unsqueeze(0),
                     "position_ids": (torch.cat([torch.arange(n) for n in lengths]) + self.position_offset)[None],
                     "cu_seqlens": torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32),
                     "max_seqlen": max(lengths)}
        else:
            width = max(len(ids) for ids, _ in chunks)
            ids = torch.full((len(chunks), width), self.pad_id, dtype=torch.long)
            types = torch.zeros((len(chunks), width), dtype=torch.long)
            mask = torch.zeros((len(chunks), width), dtype=torch.long)
            for i, (x, t) in enumerate(chunks):
                ids[i, :len(x)] = torch.tensor(x)
                types[i, :len(t)] = torch.tensor(t)
                mask[i, :len(x)] = 1
            batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if labels is not None:
            labels = np.asarray(labels)
            batch["labels"] = torch.as_tensor(labels, dtype=torch.long if labels.dtype.kind in "iu" else torch.float32)
        if self.hierarchical:
            batch["doc_index"] = torch.tensor(doc_index, dtype=torch.long)
        return batch
