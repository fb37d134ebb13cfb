"""Prediction at scale with an exported classifier: the same truncation / hierarchy as training, length-batched,
on one process or several (`accelerate launch`: each rank a disjoint slice, one merged output in input order) —
the batches run through `evaluate.gathered_logits`, the same code that evaluates dev and test in fine-tuning.

The input is prepared like training data (tokenized once into the memory-mapped store, `text/store.py`), in
tolerant mode: a row that cannot be read (not UTF-8, not JSON) or has no text is reported with its row number
and predicted as an empty text — its output row says why in `error` — or, with `skip_bad_rows`, left out. A
million-row file never stops at one bad row. Pass-through columns come from a second streaming read of the input
when the output is written (rank 0), so memory holds only the probabilities (rows × labels floats)."""
from __future__ import annotations

import csv
import json
import logging
import os
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from accelerate.utils import gather

from .classifier import Classifier
from .config import ClassificationDataConfig
from .errors import UserError
from .evaluate import gathered_logits
from .metrics import classification_metrics
from .text.batching import Collator
from .text.sources import read_records, source_of
from .text.store import prepare_split
from .text.truncation import Encoder, encoded_stats

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


def output_format(path: str) -> str:
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise UserError(f"cannot tell the output format of {path}: name it .jsonl, .csv, .tsv or .parquet")
    return fmt


def predict_file(model_dir: str, input_path: str, output_path: str, *, text_fields: Optional[list] = None,
                 label_field: Optional[str] = None, id_field: Optional[str] = None, keep: tuple = (),
                 probabilities: bool = True, skip_bad_rows: bool = False, batch_size: int = 64,
                 overwrite: bool = False, num_proc: int = 1, progress: bool = True) -> dict:
    """Classify every row of `input_path` into `output_path`; → a summary {rows, predicted, bad_rows, metrics}."""
    from transformers import AutoTokenizer

    from .data.cache import default_cache_dir
    from .distributed import init_processes
    fmt = output_format(output_path)
    if os.path.exists(output_path) and not overwrite:
        raise UserError(f"{output_path} exists; pass --overwrite to replace it")
    if not Path(model_dir).is_dir():
        raise UserError(f"model dir not found: {model_dir}")
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    state = init_processes(False)
    model, recipe = Classifier.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fields = list(text_fields or recipe.get("text_fields") or ["text"])
    label_field = label_field or recipe.get("label_field", "label")
    labels = recipe["labels"]
    data_cfg = ClassificationDataConfig(text_fields=fields, label_field=label_field)
    source = source_of(input_path, data_cfg, "test")
    wanted = [c for c in [id_field, *keep] if c]
    if wanted and state.is_main_process:  # asked-for columns that the input lacks: say so before predicting
        for _, record in read_records(source, [*fields, *wanted], label_field, True, {}):
            if isinstance(record, dict):
                missing = [c for c in wanted if c not in record]
                if missing:
                    raise UserError(f"{input_path}: no column '{missing[0]}' to pass through "
                                    f"(fields: {', '.join(map(str, record))})")
                break
    with state.main_process_first():  # rank 0 prepares (or finds the cache), the others map what it wrote
        store = prepare_split(source, fields, label_field, tokenizer, default_cache_dir(), num_proc, tolerant=True)
    bad = store.bad_rows()
    keep_mask = np.ones(store.n, dtype=bool)
    if bad and skip_bad_rows:
        keep_mask[np.searchsorted(np.asarray(store.row), [b["row"] for b in bad])] = False
    lengths = encoded_stats([store.piece_lengths(f) for f in range(len(fields))], model.text_cfg)[0]
    kept = np.flatnonzero(keep_mask)
    encoder, collate = Encoder(tokenizer, model.text_cfg), Collator(tokenizer.pad_token_id, model.hierarchical)
    model.to(state.device).eval()

    def logits_of(idx):
        rows = kept[idx]
        batch = collate([encoder.encode_pieces(store.pieces(int(i))) for i in rows], np.zeros(len(rows), np.int64))
        return model(**{k: v.to(state.device) for k, v in batch.items()})[1]

    progress_bar = None
    if progress and state.is_main_process:
        from tqdm.auto import tqdm
        progress_bar = partial(tqdm, desc=f"predict ({state.num_processes} process"
                               f"{'es' if state.num_processes > 1 else ''}, rank 0's share)", unit="batch")
    with torch.no_grad():
        logits = gathered_logits(logits_of, lengths[kept], batch_size, len(labels), state.num_processes,
                                 state.process_index, state.device, gather, progress_bar)
    summary = {}
    if state.is_main_process:
        table = np.zeros((store.n, len(labels)), dtype=np.float32)
        table[kept] = torch.softmax(torch.from_numpy(logits), -1).numpy()
        summary = _write(output_path, fmt, source, store, table, keep_mask, labels, fields, label_field, id_field,
                         list(keep), probabilities, bad)
        if bad:
            shown = "; ".join(f"row {b['row']}: {b['problem']}" for b in bad[:5])
            log.warning(f"{len(bad)} row(s) could not be read or had no text ({shown}{' …' if len(bad) > 5 else ''}) "
                        f"— {'left out' if skip_bad_rows else 'predicted as empty text, marked in the error column'}; "
                        f"all listed in {output_path}.bad_rows.jsonl")
    state.wait_for_everyone()
    return summary


def _gold(store, labels: list) -> np.ndarray:
    """The model's class id of each row's label; -1 for no label or one the model does not know."""
    index = {str(lab): i for i, lab in enumerate(labels)}
    names = store.label_names or []  # ClassLabel ids of a hub-format input name their class
    of_value = np.array([index.get(str(names[v] if isinstance(v, int) and 0 <= v < len(names) else v), -1)
                         for v in store.label_values] + [-1], dtype=np.int64)
    return of_value[np.asarray(store.label)]  # label -1 (none) picks the trailing -1


def _write(path: str, fmt: str, source, store, table: np.ndarray, keep_mask: np.ndarray, labels: list,
           fields: list, label_field: str, id_field: Optional[str], keep: list, probabilities: bool,
           bad: list) -> dict:
    """Stream the input again (for pass-through columns) and write one output row per kept input row, in order;
    written to a temp file and renamed, so an existing output is never half-replaced."""
    problems = {b["row"]: b["problem"] for b in bad} if keep_mask.all() else {}  # (skipped: no error column)
    rows = np.asarray(store.row)
    pred = table.argmax(-1)
    wanted = [c for c in [id_field, *keep] if c]
    out_rows = _output_rows(source, fields, label_field, wanted, rows, keep_mask, table, pred, labels,
                            probabilities, problems)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        n = _WRITERS[fmt](tmp, out_rows, labels, wanted, probabilities, bool(problems))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    summary = {"rows": int(store.n), "predicted": n, "bad_rows": len(bad)}
    for side in (f"{path}.bad_rows.jsonl", f"{path}.metrics.json"):  # a replaced output's are stale
        Path(side).unlink(missing_ok=True)
    if bad:
        Path(f"{path}.bad_rows.jsonl").write_text("".join(json.dumps(b) + "\n" for b in bad))
    gold = _gold(store, labels)
    scored = keep_mask & (gold >= 0)
    if scored.any():
        metrics = classification_metrics(pred[scored], gold[scored], len(labels))
        metrics.update(labels=labels, unlabeled=int((np.asarray(store.label) < 0).sum()),
                       unknown_labels=int(((np.asarray(store.label) >= 0) & (gold < 0)).sum()))
        summary["metrics"] = metrics
        Path(f"{path}.metrics.json").write_text(json.dumps(metrics, indent=1))
    return summary


def _output_rows(source, fields, label_field, wanted, rows, keep_mask, table, pred, labels, probabilities,
                 problems):
    i = 0
    for row, record in read_records(source, [*fields, *wanted], label_field, True, {}):
        if i >= len(rows) or rows[i] != row:  # (blank jsonl lines are no rows of the store either)
            continue
        if keep_mask[i]:
            found = record if isinstance(record, dict) else getattr(record, "record", None) or {}
            out = {c: found.get(c) for c in wanted}
            out["label"] = labels[int(pred[i])]
            if probabilities:
                out["probabilities"] = {str(lab): round(float(x), 6) for lab, x in zip(labels, table[i])}
            if problems:
                out["error"] = problems.get(int(row))
            yield out
        i += 1


def _write_jsonl(path, rows, labels, wanted, probabilities, errors) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n


def _flat(r: dict, labels: list) -> dict:
    p = r.pop("probabilities", None)
    if p is not None:
        r.update({f"p_{lab}": p[str(lab)] for lab in labels})
    return r


def _columns(labels, wanted, probabilities, errors) -> list:
    return [*wanted, "label", *([f"p_{lab}" for lab in labels] if probabilities else []), *(["error"] if errors else [])]


def _write_delimited(path, rows, labels, wanted, probabilities, errors, delimiter) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, _columns(labels, wanted, probabilities, errors), delimiter=delimiter)
        writer.writeheader()
        for r in rows:
            writer.writerow(_flat(r, labels))
            n += 1
    return n


def _write_parquet(path, rows, labels, wanted, probabilities, errors) -> int:
    """Pass-through columns as text (their types may differ from row to row in jsonl input)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    columns = _columns(labels, wanted, probabilities, errors)
    label_type = pa.int64() if all(isinstance(x, int) for x in labels) else pa.string()
    schema = pa.schema([(c, pa.string()) for c in wanted] + [("label", label_type)] +
                       [(c, pa.float32()) for c in columns if c.startswith("p_") and c not in wanted] +
                       ([("error", pa.string())] if errors else []))
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        buf = []
        for r in rows:
            r = _flat(r, labels)
            for c in wanted:
                r[c] = None if r[c] is None else (r[c] if isinstance(r[c], str) else json.dumps(r[c], default=str))
            buf.append(r)
            if len(buf) == 10_000:
                writer.write_table(pa.Table.from_pylist(buf, schema=schema))
                n, buf = n + len(buf), []
        if buf:
            writer.write_table(pa.Table.from_pylist(buf, schema=schema))
            n += len(buf)
    return n


_WRITERS = {"jsonl": _write_jsonl, "parquet": _write_parquet,
            "csv": lambda *a: _write_delimited(*a, ","), "tsv": lambda *a: _write_delimited(*a, "\t")}
