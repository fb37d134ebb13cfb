"""A classification task's splits: prepared splits (`store`), labels mapped to a vocabulary, a dev split carved from
train, few-shot subsets — all as numpy index arrays over the memory-mapped store (memory flat in the dataset size).

Model selection uses dev only; test is read once for the final evaluation (the paper's code selected on test)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..config import ClassificationDataConfig
from ..errors import UserError
from .sources import source_of
from .store import SplitStore, prepare_split

log = logging.getLogger(__name__)


@dataclass
class Examples:
    """Examples of one split: rows `idx` of a prepared store with their class ids."""
    store: SplitStore
    idx: np.ndarray  # int32 rows of the store
    labels: np.ndarray  # int32 class ids
    source: str

    def __len__(self) -> int:
        return len(self.idx)

    def subset(self, sel: np.ndarray) -> "Examples":
        return Examples(self.store, self.idx[sel], self.labels[sel], self.source)

    def pieces(self, j: int) -> tuple:
        return self.store.pieces(int(self.idx[j]))

    def piece_lengths(self) -> list:
        return [self.store.piece_lengths(f)[self.idx] for f in range(len(self.store.tokens))]


def read_split(spec: str, cfg: ClassificationDataConfig, split: str, tokenizer, cache_dir: Path) -> SplitStore:
    return prepare_split(source_of(spec, cfg, split), list(cfg.text_fields), cfg.label_field, tokenizer, cache_dir,
                         cfg.num_proc)


def label_vocabulary(labels) -> list:
    """Sorted distinct labels (numbers numerically, strings alphabetically); index = class id."""
    distinct = set(labels)
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in distinct):
        return sorted(int(x) for x in distinct)
    return sorted(str(x) for x in distinct)


def vocabulary(train: SplitStore) -> list:
    """The class names of a task: the ClassLabel names its training data carries, else its sorted label values."""
    return list(train.label_names) if train.label_names else label_vocabulary(train.label_values)


def class_ids(store: SplitStore, vocab: list, names: bool) -> np.ndarray:
    """Class id of every example of `store`; a label not in `vocab` is an error naming its row."""
    index = {label: i for i, label in enumerate(vocab)}
    numeric = isinstance(vocab[0], int)
    ids = np.empty(len(store.label_values), dtype=np.int32)
    for v, label in enumerate(store.label_values):
        if names and isinstance(label, int) and store.label_names in (None, vocab):
            key = vocab[label] if 0 <= label < len(vocab) else None  # a ClassLabel id
        elif names and isinstance(label, str) and label not in index and label.isdigit():
            key = vocab[int(label)] if int(label) < len(vocab) else None  # a ClassLabel id read from csv
        elif numeric:  # ints from jsonl/parquet and "0" from csv name the same class
            try:
                key = int(label)
            except (TypeError, ValueError):
                key = label
        else:
            key = str(label)
        if key not in index:
            row = int(store.row[int(np.flatnonzero(np.asarray(store.label) == v)[0])])
            raise UserError(f"{store.meta['source']} row {row}: label {label!r} is not among the training labels "
                            f"({', '.join(map(str, vocab))})")
        ids[v] = index[key]
    if store.label_names and names and store.label_names != vocab:
        raise UserError(f"{store.meta['source']}: its label names {store.label_names} differ from the training "
                        f"data's {vocab}")
    return ids[np.asarray(store.label)]


def stratified_indices(labels: np.ndarray, seed: int, *, fraction: Optional[float] = None,
                       per_class: Optional[int] = None) -> np.ndarray:
    """A seeded subset with the same class proportions (fraction) or N per class. Sorted indexes."""
    rng = np.random.default_rng(seed)
    chosen = []
    for y in np.unique(labels):
        idx = np.flatnonzero(labels == y)
        k = per_class if per_class is not None else max(1, int(round(fraction * len(idx))))
        chosen.append(rng.permutation(idx)[:min(k, len(idx))])
    return np.sort(np.concatenate(chosen))


def load_task(cfg: ClassificationDataConfig, seed: int, tokenizer, cache_dir: Path):
    """→ ({train, dev, test?}: Examples, label vocabulary). Each split is prepared once (see store.py)."""
    if not cfg.train:
        raise UserError("data.train is required (a file, a hub dataset name, or builtin:topics)")
    if not 1 <= len(cfg.text_fields) <= 2:
        raise UserError(f"data.text_fields must name one or two fields, got {cfg.text_fields}")
    train_store = read_split(cfg.train, cfg, "train", tokenizer, cache_dir)
    vocab = vocabulary(train_store)
    names = bool(train_store.label_names)
    if len(vocab) < 2:
        raise UserError(f"{cfg.train}: the training labels hold a single class ({vocab[0]!r})")

    def examples(store: SplitStore) -> Examples:
        return Examples(store, np.arange(store.n, dtype=np.int32), class_ids(store, vocab, names), store.meta["source"])

    train = examples(train_store)
    if cfg.dev:
        dev = examples(read_split(cfg.dev, cfg, "dev", tokenizer, cache_dir))
    else:
        if not 0 < cfg.dev_ratio < 1:
            raise UserError(f"data.dev_ratio must be in (0, 1) when no dev split is given, got {cfg.dev_ratio}")
        dev_idx = stratified_indices(train.labels, seed, fraction=cfg.dev_ratio)
        keep = np.ones(len(train), dtype=bool)
        keep[dev_idx] = False
        dev, train = train.subset(dev_idx), train.subset(keep)
        log.info(f"dev split: {len(dev_idx)} stratified examples carved from {cfg.train} "
                 f"(data.dev_ratio={cfg.dev_ratio})")
    if cfg.few_shot_fraction is not None or cfg.few_shot_per_class is not None:
        if cfg.few_shot_fraction is not None and not 0 < cfg.few_shot_fraction <= 1:
            raise UserError(f"data.few_shot_fraction must be in (0, 1], got {cfg.few_shot_fraction}")
        if cfg.few_shot_per_class is not None and cfg.few_shot_per_class < 1:
            raise UserError(f"data.few_shot_per_class must be >= 1, got {cfg.few_shot_per_class}")
        idx = stratified_indices(train.labels, seed + 1, fraction=cfg.few_shot_fraction,
                                 per_class=cfg.few_shot_per_class)
        train = train.subset(idx)
        log.info(f"few-shot: training on {len(idx)} examples")
    splits = {"train": train, "dev": dev}
    if cfg.test:
        splits["test"] = examples(read_split(cfg.test, cfg, "test", tokenizer, cache_dir))
    for name, split in splits.items():
        if len(split) == 0:
            raise UserError(f"the {name} split of {cfg.train} is empty")
    return splits, vocab
