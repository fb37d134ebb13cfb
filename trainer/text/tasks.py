"""A classification task's splits: prepared splits (`store`), labels turned into targets of the task's kind
(`trainer/problems.py`: class ids, multi-hot label sets, numbers), a dev split carved from train, few-shot
subsets — all as numpy arrays over the memory-mapped store (memory flat in the dataset size).

Model selection uses dev only; test is read once for the final evaluation (the paper's code selected on test)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .. import problems
from ..config import ClassificationDataConfig
from ..errors import UserError
from .sources import source_of
from .store import SplitStore, prepare_split

log = logging.getLogger(__name__)

STRATA = {problems.SINGLE: "class", problems.MULTI: "each example's rarest label",
          problems.REGRESSION: "target decile"}


@dataclass
class Examples:
    """Examples of one split: rows `idx` of a prepared store with their targets."""
    store: SplitStore
    idx: np.ndarray  # int32 rows of the store
    labels: np.ndarray  # targets (problems.py): int32 class ids, float32 [n, labels] multi-hot, float32 values
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
                         cfg.num_proc, empty_label_set=cfg.problem_type == problems.MULTI)


def stratified_indices(labels: np.ndarray, seed: int, *, fraction: Optional[float] = None,
                       per_class: Optional[int] = None) -> np.ndarray:
    """A seeded subset with the same proportions of each group (fraction) or N per group — `labels` are group ids
    (`problems.strata`: classes, rarest labels, target bins). Sorted indexes."""
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
    kind = cfg.problem_type
    train_store = read_split(cfg.train, cfg, "train", tokenizer, cache_dir)
    vocab = problems.vocabulary(kind, train_store, cfg.label_field, cfg.label_separator)
    names = bool(train_store.label_names)
    if kind == problems.SINGLE and len(vocab) < 2:
        raise UserError(f"{cfg.train}: the training labels hold a single class ({vocab[0]!r})")
    if kind == problems.MULTI and not vocab:
        raise UserError(f"{cfg.train}: no example has a label")
    if kind == problems.REGRESSION and cfg.few_shot_per_class is not None:
        raise UserError("data.few_shot_per_class needs classes; a regression task takes data.few_shot_fraction")

    def examples(store: SplitStore) -> Examples:
        return Examples(store, np.arange(store.n, dtype=np.int32),
                        problems.targets(kind, store, vocab, cfg.label_separator, names), store.meta["source"])

    train = examples(train_store)
    if cfg.dev:
        dev = examples(read_split(cfg.dev, cfg, "dev", tokenizer, cache_dir))
    else:
        if not 0 < cfg.dev_ratio < 1:
            raise UserError(f"data.dev_ratio must be in (0, 1) when no dev split is given, got {cfg.dev_ratio}")
        dev_idx = stratified_indices(problems.strata(kind, train.labels), seed, fraction=cfg.dev_ratio)
        keep = np.ones(len(train), dtype=bool)
        keep[dev_idx] = False
        dev, train = train.subset(dev_idx), train.subset(keep)
        log.info(f"dev split: {len(dev_idx)} examples carved from {cfg.train}, stratified by "
                 f"{STRATA[kind]} "
                 f"(data.dev_ratio={cfg.dev_ratio})")
    if cfg.few_shot_fraction is not None or cfg.few_shot_per_class is not None:
        if cfg.few_shot_fraction is not None and not 0 < cfg.few_shot_fraction <= 1:
            raise UserError(f"data.few_shot_fraction must be in (0, 1], got {cfg.few_shot_fraction}")
        if cfg.few_shot_per_class is not None and cfg.few_shot_per_class < 1:
            raise UserError(f"data.few_shot_per_class must be >= 1, got {cfg.few_shot_per_class}")
        idx = stratified_indices(problems.strata(kind, train.labels), seed + 1, fraction=cfg.few_shot_fraction,
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
