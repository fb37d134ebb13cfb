"""Classification data: read splits, map labels to a vocabulary, carve a dev split, take few-shot subsets.

Model selection uses dev only; test is read once for the final evaluation (the paper's code selected on test)."""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..config import ClassificationDataConfig
from ..corpus.builtin import BUILTIN_PREFIX, labelled_examples

BUILTIN_TASKS = ("builtin:topics", "builtin:polarity", "builtin:length")
from ..corpus.sources import _field, _looks_like_hub_name, file_format, iter_records
from ..errors import UserError


@dataclass
class Split:
    texts: list  # list[tuple[str, ...]] — one or two fields per example
    labels: list  # raw labels as read (str or int)
    source: str
    rows: Optional[list] = None  # file row of each example, for error messages


def read_split(spec: str, cfg: ClassificationDataConfig, split: str) -> Split:
    if spec.startswith(BUILTIN_PREFIX):
        if spec not in BUILTIN_TASKS:
            raise UserError(f"unknown builtin dataset '{spec}' (known: {', '.join(BUILTIN_TASKS)})")
        pairs = list(labelled_examples(spec[len(BUILTIN_PREFIX):], split))
        return Split([(t,) for t, _ in pairs], [lab for _, lab in pairs], spec, list(range(1, len(pairs) + 1)))
    exists = os.path.exists(spec)
    fmt = "hub" if cfg.format == "hub" or (not exists and cfg.format == "auto" and _looks_like_hub_name(spec)) else None
    if fmt is None:
        if not exists:
            raise UserError(f"data file not found: {spec}")
        fmt = file_format(spec, cfg.format)
        if fmt == "txt":
            raise UserError(f"{spec}: classification data needs a labelled format (jsonl, csv, tsv, parquet)")
        source = spec
    else:
        source = f"{spec}{':' + cfg.hub_config if cfg.hub_config else ''}::{cfg.hub_splits.get(split, split)}"
    fields = [*cfg.text_fields, cfg.label_field]
    texts, labels, rows = [], [], []
    for row, record in iter_records(source, fmt, fields):
        if cfg.label_field not in record or record[cfg.label_field] in (None, ""):
            raise UserError(f"{spec} row {row}: no label field '{cfg.label_field}' "
                            f"(fields: {', '.join(map(str, record))})")
        item = tuple(_field(record, f, spec, row) for f in cfg.text_fields)
        if not any(t.strip() for t in item):
            raise UserError(f"{spec} row {row}: empty text in field(s) {', '.join(cfg.text_fields)}")
        texts.append(item)
        labels.append(record[cfg.label_field])
        rows.append(row)
    if not texts:
        raise UserError(f"{spec}: no examples")
    return Split(texts, labels, spec, rows)


def label_vocabulary(labels: list) -> list:
    """Sorted distinct labels (numbers numerically, strings alphabetically); index = class id."""
    distinct = set(labels)
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in distinct):
        return sorted(int(x) for x in distinct)
    return sorted(str(x) for x in distinct)


def encode_labels(split: Split, vocab: list) -> np.ndarray:
    index = {label: i for i, label in enumerate(vocab)}
    numeric = isinstance(vocab[0], int)
    out = np.empty(len(split.labels), dtype=np.int64)
    for i, label in enumerate(split.labels):
        key = str(label)
        if numeric:  # ints from jsonl/parquet and "0" from csv name the same class
            try:
                key = int(label)
            except (TypeError, ValueError):
                pass
        if key not in index:
            row = split.rows[i] if split.rows else i + 1
            raise UserError(f"{split.source} row {row}: label {label!r} is not among the training labels "
                            f"({', '.join(map(str, vocab))})")
        out[i] = index[key]
    return out


def stratified_indices(labels: np.ndarray, seed: int, *, fraction: Optional[float] = None,
                       per_class: Optional[int] = None) -> np.ndarray:
    """A seeded subset with the same class proportions (fraction) or N per class. Sorted indexes."""
    rng = np.random.default_rng(seed)
    by_class = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[int(y)].append(i)
    chosen = []
    for y in sorted(by_class):
        idx = np.array(by_class[y])
        k = per_class if per_class is not None else max(1, int(round(fraction * len(idx))))
        chosen.extend(rng.permutation(idx)[:min(k, len(idx))])
    return np.sort(np.array(chosen, dtype=np.int64))


def subset(split: Split, idx: np.ndarray) -> Split:
    rows = [split.rows[i] for i in idx] if split.rows else None
    return Split([split.texts[i] for i in idx], [split.labels[i] for i in idx], split.source, rows)


def load_task(cfg: ClassificationDataConfig, seed: int, log=print):
    """→ (splits {train, dev, test?}, label ids per split, label vocabulary)."""
    if not cfg.train:
        raise UserError("data.train is required (a file, a hub dataset name, or builtin:topics)")
    if not 1 <= len(cfg.text_fields) <= 2:
        raise UserError(f"data.text_fields must name one or two fields, got {cfg.text_fields}")
    train = read_split(cfg.train, cfg, "train")
    vocab = label_vocabulary(train.labels)
    if len(vocab) < 2:
        raise UserError(f"{cfg.train}: the training labels hold a single class ({vocab[0]!r})")
    y_train = encode_labels(train, vocab)
    if cfg.dev:
        dev = read_split(cfg.dev, cfg, "dev")
    else:
        if not 0 < cfg.dev_ratio < 1:
            raise UserError(f"data.dev_ratio must be in (0, 1) when no dev split is given, got {cfg.dev_ratio}")
        dev_idx = stratified_indices(y_train, seed, fraction=cfg.dev_ratio)
        keep = np.setdiff1d(np.arange(len(y_train)), dev_idx)
        dev, train = subset(train, dev_idx), subset(train, keep)
        y_train = y_train[keep]
        log(f"dev split: {len(dev_idx)} stratified examples carved from {cfg.train} (data.dev_ratio={cfg.dev_ratio})")
    if cfg.few_shot_fraction is not None or cfg.few_shot_per_class is not None:
        if cfg.few_shot_fraction is not None and not 0 < cfg.few_shot_fraction <= 1:
            raise UserError(f"data.few_shot_fraction must be in (0, 1], got {cfg.few_shot_fraction}")
        if cfg.few_shot_per_class is not None and cfg.few_shot_per_class < 1:
            raise UserError(f"data.few_shot_per_class must be >= 1, got {cfg.few_shot_per_class}")
        idx = stratified_indices(y_train, seed + 1, fraction=cfg.few_shot_fraction, per_class=cfg.few_shot_per_class)
        train, y_train = subset(train, idx), y_train[idx]
        log(f"few-shot: training on {len(idx)} examples")
    splits = {"train": train, "dev": dev}
    labels = {"train": y_train, "dev": encode_labels(dev, vocab)}
    if cfg.test:
        splits["test"] = read_split(cfg.test, cfg, "test")
        labels["test"] = encode_labels(splits["test"], vocab)
    return splits, labels, vocab
