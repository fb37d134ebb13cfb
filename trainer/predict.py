"""Prediction at scale with an exported classifier: the same truncation / hierarchy as training, length-batched,
on one process or several (`accelerate launch`: each rank a disjoint slice, one merged output in input order) —
the batches run through `evaluate.gathered_logits`, the same code that evaluates dev and test in fine-tuning.

The input is prepared like training data (tokenized once into the memory-mapped store, `text/store.py`), in
tolerant mode: a row that cannot be read (not UTF-8, not JSON) or has no text is reported with its row number
and predicted as an empty text — its output row says why in `error` — or, with `skip_bad_rows`, left out. A
million-row file never stops at one bad row. Pass-through columns come from a second streaming read of the input
when the output is written (rank 0), so memory holds only the model outputs and probabilities (2 × rows × labels
floats).

What a row gets follows the model's problem type (trainer/problems.py): `label` and each class's softmax
probability (single_label); `labels`, the list of labels whose sigmoid probability reaches the label's threshold,
and every label's probability (multi_label); `value`, in the training data's scale (regression)."""
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

from . import problems
from .classifier import Classifier, read_recipe
from .config import ClassificationDataConfig, TextConfig
from .errors import UserError
from .evaluate import gathered_logits
from .onnx_export import FILES, OnnxClassifier
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
                 overwrite: bool = False, num_proc: int = 1, progress: bool = True, backend: str = "torch",
                 return_outputs: bool = False) -> dict:
    """Classify every row of `input_path` into `output_path`; → a summary {rows, predicted, bad_rows, metrics}
    (+ `outputs`, the model's raw outputs per input row, with `return_outputs`; main process).
    backend: torch, or onnx / onnx-int8 — the export's ONNX graph through onnxruntime (trainer/onnx_export.py),
    with the same inputs, outputs, bad-row handling and split over processes."""
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
    if backend not in ("torch", *FILES):
        raise UserError(f"--backend must be torch, {' or '.join(FILES)}; got {backend}")
    state = init_processes(False)
    recipe = read_recipe(model_dir)
    text_cfg = TextConfig(**recipe["text"])
    if backend == "torch":
        model = Classifier.from_pretrained(model_dir)[0].to(state.device).eval()

        def run_batch(batch):
            return model(**{k: v.to(state.device) if torch.is_tensor(v) else v for k, v in batch.items()})[1]
    else:  # the ONNX graph alone: the PyTorch model is not loaded
        run_batch = OnnxClassifier(model_dir, backend)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fields = list(text_fields or recipe.get("text_fields") or ["text"])
    label_field = label_field or recipe.get("label_field", "label")
    labels, kind = recipe["labels"], recipe["problem_type"]
    thresholds = np.asarray(recipe["thresholds"], dtype=np.float32) if kind == problems.MULTI else None
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
        store = prepare_split(source, fields, label_field, tokenizer, default_cache_dir(), num_proc, tolerant=True,
                              empty_label_set=kind == problems.MULTI)
    bad = store.bad_rows()
    keep_mask = np.ones(store.n, dtype=bool)
    if bad and skip_bad_rows:
        keep_mask[np.searchsorted(np.asarray(store.row), [b["row"] for b in bad])] = False
    lengths = encoded_stats([store.piece_lengths(f) for f in range(len(fields))], text_cfg)[0]
    kept = np.flatnonzero(keep_mask)
    encoder = Encoder(tokenizer, text_cfg)
    collate = Collator(tokenizer.pad_token_id, text_cfg.strategy == "hierarchical")

    def logits_of(idx):
        return run_batch(collate([encoder.encode_pieces(store.pieces(int(i))) for i in kept[idx]]))

    progress_bar = None
    if progress and state.is_main_process:
        from tqdm.auto import tqdm
        progress_bar = partial(tqdm, desc=f"predict ({state.num_processes} process"
                               f"{'es' if state.num_processes > 1 else ''}, rank 0's share)", unit="batch")
    with torch.no_grad():
        logits = gathered_logits(logits_of, lengths[kept], batch_size, problems.num_outputs(kind, labels),
                                 state.num_processes, state.process_index, state.device, gather, progress_bar)
    summary = {}
    if state.is_main_process:
        raw = np.zeros((store.n, logits.shape[1]), dtype=np.float32)  # the model's outputs, every row
        raw[kept] = logits
        table = {problems.SINGLE: problems.softmax, problems.MULTI: problems.sigmoid}.get(kind, lambda x: x)(raw)
        out = Output(kind, labels, thresholds, fields, label_field, id_field, list(keep),
                     probabilities and kind != problems.REGRESSION, recipe.get("label_separator", ","))
        summary = _write(output_path, fmt, source, store, raw, table, keep_mask, out, bad)
        if return_outputs:
            summary["outputs"] = raw
        if bad:
            shown = "; ".join(f"row {b['row']}: {b['problem']}" for b in bad[:5])
            log.warning(f"{len(bad)} row(s) could not be read or had no text ({shown}{' …' if len(bad) > 5 else ''}) "
                        f"— {'left out' if skip_bad_rows else 'predicted as empty text, marked in the error column'}; "
                        f"all listed in {output_path}.bad_rows.jsonl")
    state.wait_for_everyone()
    return summary


class Output:
    """What an output row holds, by problem type (module docstring)."""

    def __init__(self, kind: str, labels: list, thresholds, fields: list, label_field: str, id_field, keep: list,
                 probabilities: bool, separator: str):
        self.kind, self.labels, self.thresholds = kind, labels, thresholds
        self.fields, self.label_field, self.probabilities, self.separator = fields, label_field, probabilities, separator
        self.wanted = [c for c in [id_field, *keep] if c]
        self.column = {problems.SINGLE: "label", problems.MULTI: "labels", problems.REGRESSION: "value"}[kind]

    def prediction(self, row: np.ndarray):
        if self.kind == problems.SINGLE:
            return self.labels[int(row.argmax())]
        if self.kind == problems.MULTI:
            return [lab for lab, p, t in zip(self.labels, row, self.thresholds) if p >= t]
        return float(row[0])


def _gold(store, out: Output) -> tuple[np.ndarray, np.ndarray]:
    """(targets, known): each row's label as the model's target (problems.py), and whether it has one the model
    knows (no label, or a label outside the model's, is left out of the metrics and counted)."""
    labels = out.labels
    index = {str(lab): i for i, lab in enumerate(labels)}
    names = store.label_names or []  # ClassLabel ids of a hub-format input name their class
    rows = np.asarray(store.label)
    n_values = len(store.label_values)
    known_value = np.zeros(n_values + 1, dtype=bool)  # (+1: label -1, no label, picks the trailing False)
    if out.kind == problems.SINGLE:
        ids = np.full(n_values + 1, -1, dtype=np.int64)
        for v, value in enumerate(store.label_values):
            if not isinstance(value, list):
                ids[v] = index.get(str(names[value] if isinstance(value, int) and 0 <= value < len(names) else value), -1)
        return ids[rows], ids[rows] >= 0
    if out.kind == problems.MULTI:
        table = np.zeros((n_values + 1, len(labels)), dtype=np.float32)
        for v, value in enumerate(store.label_values):
            found = [index.get(str(lab)) for lab in problems.label_set(
                store, v, value, out.separator if isinstance(value, str) else "", names)]
            if None not in found:
                table[v, found], known_value[v] = 1.0, True
        return table[rows], known_value[rows]
    values = np.zeros(n_values + 1, dtype=np.float64)
    for v, value in enumerate(store.label_values):
        try:
            values[v] = float(value)
            known_value[v] = bool(np.isfinite(values[v]))
        except (TypeError, ValueError):
            pass
    return values[rows], known_value[rows]


def _write(path: str, fmt: str, source, store, raw: np.ndarray, table: np.ndarray, keep_mask: np.ndarray,
           out: Output, bad: list) -> dict:
    """Stream the input again (for pass-through columns) and write one output row per kept input row, in order;
    written to a temp file and renamed, so an existing output is never half-replaced. `raw`: the model's outputs
    (the metrics take them as fine-tuning's evaluation does); `table`: the probabilities (or values) written."""
    problems_of = {b["row"]: b["problem"] for b in bad} if keep_mask.all() else {}  # (skipped: no error column)
    rows = np.asarray(store.row)
    out_rows = _output_rows(source, out, rows, keep_mask, table, problems_of)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        n = _WRITERS[fmt](tmp, out_rows, out, bool(problems_of))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    summary = {"rows": int(store.n), "predicted": n, "bad_rows": len(bad)}
    for side in (f"{path}.bad_rows.jsonl", f"{path}.metrics.json"):  # a replaced output's are stale
        Path(side).unlink(missing_ok=True)
    if bad:
        Path(f"{path}.bad_rows.jsonl").write_text("".join(json.dumps(b) + "\n" for b in bad))
    gold, known = _gold(store, out)
    scored = keep_mask & known
    if scored.any():
        metrics = problems.metrics(out.kind, raw[scored], gold[scored], out.labels, out.thresholds)
        labelled = np.asarray(store.label) >= 0
        metrics.update(problem_type=out.kind, labels=out.labels, unlabeled=int((~labelled).sum()),
                       unknown_labels=int((labelled & ~known).sum()))
        summary["metrics"] = metrics
        Path(f"{path}.metrics.json").write_text(json.dumps(metrics, indent=1))
    return summary


def _output_rows(source, out: Output, rows, keep_mask, table, problems_of):
    i = 0
    for row, record in read_records(source, [*out.fields, *out.wanted], out.label_field, True, {}):
        if i >= len(rows) or rows[i] != row:  # (blank jsonl lines are no rows of the store either)
            continue
        if keep_mask[i]:
            found = record if isinstance(record, dict) else getattr(record, "record", None) or {}
            r = {c: found.get(c) for c in out.wanted}
            r[out.column] = out.prediction(table[i])
            if out.probabilities:
                r["probabilities"] = {str(lab): round(float(x), 6) for lab, x in zip(out.labels, table[i])}
            if problems_of:
                r["error"] = problems_of.get(int(row))
            yield r
        i += 1


def _write_jsonl(path, rows, out: Output, errors) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n


def _flat(r: dict, out: Output) -> dict:
    p = r.pop("probabilities", None)
    if p is not None:
        r.update({f"p_{lab}": p[str(lab)] for lab in out.labels})
    return r


def _columns(out: Output, errors) -> list:
    return [*out.wanted, out.column, *([f"p_{lab}" for lab in out.labels] if out.probabilities else []),
            *(["error"] if errors else [])]


def _write_delimited(path, rows, out: Output, errors, delimiter) -> int:
    """A multi-label row's labels are one cell, joined with the separator the model was trained with."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, _columns(out, errors), delimiter=delimiter)
        writer.writeheader()
        for r in rows:
            r = _flat(r, out)
            if out.kind == problems.MULTI:
                r["labels"] = out.separator.join(map(str, r["labels"]))
            writer.writerow(r)
            n += 1
    return n


def _write_parquet(path, rows, out: Output, errors) -> int:
    """Pass-through columns as text (their types may differ from row to row in jsonl input)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    columns = _columns(out, errors)
    label_type = pa.int64() if all(isinstance(x, int) for x in out.labels) else pa.string()
    prediction_type = {problems.SINGLE: label_type, problems.MULTI: pa.list_(label_type),
                       problems.REGRESSION: pa.float64()}[out.kind]
    schema = pa.schema([(c, pa.string()) for c in out.wanted] + [(out.column, prediction_type)] +
                       [(c, pa.float32()) for c in columns if c.startswith("p_") and c not in out.wanted] +
                       ([("error", pa.string())] if errors else []))
    n = 0
    with pq.ParquetWriter(path, schema) as writer:
        buf = []
        for r in rows:
            r = _flat(r, out)
            for c in out.wanted:
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
