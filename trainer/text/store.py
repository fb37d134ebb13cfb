"""Classification data prepared once: the word pieces of every text field, memory-mapped, shared by ranks and stages.

A split (a file, a hub dataset split, a builtin task) is read once, tokenized with the model's fast tokenizer
(`num_proc` worker processes) and written to a cache entry — the corpus cache's directory and its one-preparer-
per-entry lock (`data.cache.build_once`), so ranks, nodes sharing the filesystem, recipe stages and later
runs all map the same files:

    tok_<f>.bin  word pieces of text field f, back to back (uint16, or uint32 for vocabularies > 65,535)
    off_<f>.npy  int64 offsets into it (n + 1)
    len_<f>.npy  int32 pieces per example (read whole for length grouping; the offsets stay untouched pages)
    label.npy    int32 index into meta["label_values"] (-1: no label)
    row.npy      int64 row of the source, for messages
    meta.json    source, fields, label values (and ClassLabel names), sizes of the files above

Pieces are stored *before* truncation and without [CLS]/[SEP]: head, tail, head+tail and hierarchical chunks are
cut from them when a batch is built (`truncation.Encoder.encode_pieces`), so one entry serves every strategy and
`max_len` (the paper's Table 2 grid prepares each dataset once). The cost is disk for the full text (4 bytes
per piece at most; IMDb's 25 k reviews: ~30 MB), which is also what a later run with another max_len would need.

The key: (source — path, size and mtime; a hub dataset's name, config, split and resolved revision; a local
hub-format folder's files — the tokenizer's content, text and label fields, format version). Memory stays flat
in the dataset size: reading streams records, the arrays are mapped, nothing per example is a Python object."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..data.cache import build_once, tokenizer_digest
from ..data.records import BadRow
from ..data.tokenize_pool import TokenizePool
from ..errors import UserError
from .sources import Source, read_records

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # 3: non-integer numbers kept as numbers, lists as lists (multi-label)
BATCH = 1000  # records per tokenizer call


@dataclass
class SplitStore:
    """A prepared split, memory-mapped."""
    path: Path
    meta: dict

    def __post_init__(self):
        self.n = self.meta["n"]
        self.tokens, self.offsets = [], []
        for f in range(len(self.meta["text_fields"])):
            self.tokens.append(np.memmap(self.path / f"tok_{f}.bin", dtype=self.meta["dtype"], mode="r")
                               if self.meta["pieces"][f] else np.zeros(0, dtype=self.meta["dtype"]))
            self.offsets.append(np.load(self.path / f"off_{f}.npy", mmap_mode="r"))
        self.label = np.load(self.path / "label.npy", mmap_mode="r")
        self.row = np.load(self.path / "row.npy", mmap_mode="r")

    @property
    def label_values(self) -> list:
        return self.meta["label_values"]

    @property
    def label_names(self) -> Optional[list]:
        return self.meta.get("label_names")

    def piece_lengths(self, field: int) -> np.ndarray:
        return np.load(self.path / f"len_{field}.npy")

    def pieces(self, i: int) -> tuple:
        """Word pieces of example i, one list per text field."""
        return tuple(tok[off[i]:off[i + 1]].tolist() for tok, off in zip(self.tokens, self.offsets))

    def bad_rows(self) -> list:
        path = self.path / "bad.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def prepare_split(source: Source, text_fields: list, label_field: Optional[str], tokenizer, cache_dir: Path,
                  num_proc: int = 1, tolerant: bool = False, empty_label_set: bool = False) -> SplitStore:
    """The prepared split (built on one process per cache entry, mapped by all).

    tolerant (prediction): a row that cannot be read or has no text becomes an empty example listed in
    `bad.jsonl` instead of an error; a missing or odd label is -1. empty_label_set (multi-label): an empty label
    cell (csv / tsv) is the empty list of labels, not a missing label."""
    key = hashlib.sha1(json.dumps([FORMAT_VERSION, source.fingerprint(), tokenizer_digest(tokenizer),
                                   text_fields, label_field, tolerant, empty_label_set],
                                  sort_keys=True).encode()).hexdigest()[:16]
    final = build_once(Path(cache_dir) / f"cls-{key}", source.describe(),
                       lambda tmp: _build(source, text_fields, label_field, tokenizer, tmp, num_proc, tolerant,
                                          empty_label_set))
    return load(final)


def load(path: Path) -> SplitStore:
    try:
        meta = json.loads((path / "meta.json").read_text())
        bad = [name for name, size in meta["files"].items()
               if not (path / name).is_file() or (path / name).stat().st_size != size]
    except (OSError, ValueError, KeyError):
        bad = ["meta.json"]
    if bad:
        raise UserError(f"the prepared data in {path} is damaged ({bad[0]} missing or of the wrong size); "
                        f"delete that folder and run again to prepare it anew")
    return SplitStore(path, meta)


def _label_value(value):
    """A label as stored: int for integers (also 3.0 and numpy ints), float for other numbers, a tuple for a list
    of labels (multi-label; written to meta.json as a list), str otherwise; None if absent. What the values mean
    (a class, a label set, a regression target) is the task's to say (`trainer/problems.py`)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(v for v in (_label_value(x) for x in value) if v is not None)
    if isinstance(value, (bool, np.bool_, int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if float(value).is_integer() else float(value)
    return value if isinstance(value, str) else str(value)


def _class_label_ids(value, n: int) -> bool:
    """A stored value that ClassLabel names can name: an id, or a list of ids (`Sequence(ClassLabel)`)."""
    items = value if isinstance(value, tuple) else (value,)
    return all(isinstance(v, int) and 0 <= v < n for v in items)


def _shown(value) -> str:
    return repr(list(value) if isinstance(value, tuple) else value)


def _label_kind(value) -> str:
    return "a list" if isinstance(value, tuple) else "the number" if isinstance(value, (int, float)) else "the text"


class _Writer:
    """Appends tokenized batches to the arrays of one split."""

    def __init__(self, out: Path, n_fields: int, dtype):
        self.out, self.dtype = out, dtype
        self.tok = [open(out / f"tok_{f}.bin", "wb") for f in range(n_fields)]
        self.lengths = [[] for _ in range(n_fields)]
        self.labels, self.rows = [], []

    def add(self, pieces_per_field: list, labels: list, rows: list):
        for f, pieces in enumerate(pieces_per_field):
            lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
            flat = np.fromiter((t for p in pieces for t in p), dtype=self.dtype, count=int(lengths.sum()))
            flat.tofile(self.tok[f])
            self.lengths[f].append(lengths)
        self.labels.append(np.asarray(labels, dtype=np.int32))
        self.rows.append(np.asarray(rows, dtype=np.int64))

    def close(self) -> dict:
        pieces = []
        for f, handle in enumerate(self.tok):
            handle.close()
            lengths = np.concatenate(self.lengths[f]) if self.lengths[f] else np.zeros(0, np.int64)
            np.save(self.out / f"off_{f}.npy", np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
            np.save(self.out / f"len_{f}.npy", lengths.astype(np.int32))
            pieces.append(int(lengths.sum()))
        np.save(self.out / "label.npy", np.concatenate(self.labels) if self.labels else np.zeros(0, np.int32))
        np.save(self.out / "row.npy", np.concatenate(self.rows) if self.rows else np.zeros(0, np.int64))
        return {"pieces": pieces}


def _build(source: Source, text_fields: list, label_field: Optional[str], tokenizer, out: Path, num_proc: int,
           tolerant: bool, empty_label_set: bool = False) -> dict:
    t0 = time.time()
    what = source.describe()
    meta: dict = {}
    fields = [*text_fields, label_field] if label_field else list(text_fields)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    writer = _Writer(out, len(text_fields), dtype)
    values: dict = {}  # label value → index, in order of first appearance
    first_of_type: dict = {}  # kind (number / text / list) → (row, value): a split mixing kinds is refused
    bad = open(out / "bad.jsonl", "w") if tolerant else None
    n = n_bad = 0

    def batches():
        nonlocal n, n_bad
        texts, labels, rows = [], [], []
        for row, record in read_records(source, fields, label_field, tolerant, meta):
            problem = record if isinstance(record, BadRow) else None
            if problem is None:
                missing = [f for f in fields if f not in record and (f != label_field or not tolerant)]
                if missing:
                    what_field = "label field" if missing[0] == label_field else "field"
                    problem = f"no {what_field} '{missing[0]}' (fields: {', '.join(map(str, record))})"
            item = None
            if problem is None:
                item = ["" if record[f] is None else (record[f] if isinstance(record[f], str) else str(record[f]))
                        for f in text_fields]
                if not any(t.strip() for t in item):
                    problem = f"empty text in field(s) {', '.join(text_fields)}"
            label = -1
            if problem is None and label_field:
                value = _label_value(record.get(label_field))
                if value is None and empty_label_set and label_field in record:
                    value = ""  # a csv cell holding no label: the empty set, once split (problems.label_set)
                if value is None and not tolerant:
                    problem = f"no label field '{label_field}' (empty)"
                elif value is not None:
                    first_of_type.setdefault(_label_kind(value), (row, value))
                    if len(first_of_type) > 1 and not tolerant:
                        (k1, (r1, v1)), (k2, (r2, v2)) = list(first_of_type.items())[:2]
                        hint = ("; a text with one label of a multi-label task is a list of one"
                                if "a list" in first_of_type else "")
                        raise UserError(f"{what}: mixed label types — row {r1} has {k1} {_shown(v1)}, row {r2} {k2} "
                                        f"{_shown(v2)}; use one type for every label{hint}")
                    label = values.setdefault(value, len(values))
            if problem is not None:
                if not tolerant:
                    raise UserError(f"{what} row {row}: {problem}")
                bad.write(json.dumps({"row": row, "problem": str(problem)}) + "\n")
                n_bad += 1
                item = [""] * len(text_fields)
            texts.append(item)
            labels.append(label)
            rows.append(row)
            n += 1
            if len(texts) == BATCH:
                yield texts, labels, rows
                texts, labels, rows = [], [], []
        if texts:
            yield texts, labels, rows

    def flat(batch):  # one tokenizer call per batch: the fields one after another
        return [t for f in range(len(text_fields)) for t in (item[f] for item in batch[0])]

    try:
        with TokenizePool(tokenizer, num_proc, out) as pool:
            for (texts, labels, rows), ids in pool.map(batches(), flat):
                k = len(texts)
                writer.add([ids[f * k:(f + 1) * k] for f in range(len(text_fields))], labels, rows)
    finally:
        if bad is not None:
            bad.close()
    if n == 0:
        raise UserError(f"{what}: no examples")
    meta.update(writer.close())
    if not tolerant:
        (out / "bad.jsonl").unlink(missing_ok=True)
    names = meta.get("label_names")
    if names is not None and any(not _class_label_ids(v, len(names)) for v in values):
        names = meta["label_names"] = None  # not ClassLabel ids after all: the values are the labels
    files = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    elapsed = time.time() - t0
    tokens = sum(meta["pieces"])
    log.info(f"prepared {what}: {n} examples{f' ({n_bad} unreadable or empty, listed in bad.jsonl)' if n_bad else ''}, "
             f"{tokens} word pieces in {elapsed:.1f}s ({tokens / max(elapsed, 1e-9):,.0f} pieces/s)")
    return {"format_version": FORMAT_VERSION, "source": what, "n": n, "text_fields": list(text_fields),
            "label_field": label_field, "label_values": list(values), "label_names": names,
            "dtype": np.dtype(dtype).name, "pieces": meta["pieces"], "bad_rows": n_bad,
            "tokenizer_digest": tokenizer_digest(tokenizer), "files": files}
