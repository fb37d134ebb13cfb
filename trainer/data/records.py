"""Records of jsonl / csv / tsv / parquet files (optionally .gz) and hub datasets, streamed one at a time: a
corpus or a file to classify never has to fit in memory. Every problem is a `UserError` naming the file and row."""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..errors import UserError
from .builtin import BUILTIN_PREFIX
from .hub import stream_records

_EXTS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
         ".parquet": "parquet"}


def looks_like_hub_name(name: str) -> bool:
    """A name that is no file may still be a hub dataset — unless it has a file's extension, a glob or a path's
    start, when "not found" is the truer message."""
    return not any(name.endswith(ext) or name.endswith(ext + ".gz") for ext in _EXTS) and "*" not in name \
        and not name.startswith((".", "/", "~"))


def file_format(path: str, declared: str) -> str:
    if path.startswith(BUILTIN_PREFIX):
        return "builtin"
    if declared != "auto":
        return declared
    if not os.path.exists(path):
        return "hub"
    stem = path[:-3] if path.endswith(".gz") else path
    fmt = _EXTS.get(Path(stem).suffix.lower())
    if fmt is None:
        raise UserError(f"cannot tell the format of {path}; set format: txt|jsonl|csv|tsv|parquet")
    return fmt


def open_bytes(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def open_text(path: str, errors: str = "strict") -> io.TextIOBase:
    return io.TextIOWrapper(open_bytes(path), encoding="utf-8", errors=errors, newline="")


class BadRow(str):
    """What is wrong with a row that `iter_records(..., tolerant=True)` could not read (yielded in its place);
    `record`: what could still be read of it (a JSON line with a stray non-UTF-8 byte), for pass-through."""
    record: Optional[dict] = None


def iter_records(path: str, fmt: str, fields: Optional[list] = None, tolerant: bool = False,
                 optional: tuple = ()) -> Iterator[tuple[int, dict]]:
    """(row number, record) of a jsonl/csv/tsv/parquet file (or a hub dataset); rows count from 1.

    A row that cannot be read (not UTF-8, not JSON, not an object) is an error naming it — or, with `tolerant`,
    yielded as (row, BadRow(reason)) and reading goes on (prediction over a million rows does not stop at one).
    A file without a column of `fields` is an error unless the column is `optional`."""
    required = [f for f in fields or [] if f not in optional]
    with read_errors(path):
        if fmt in ("csv", "tsv"):
            yield from _records_delimited(path, required, "," if fmt == "csv" else "\t", tolerant)
        elif fmt == "jsonl":
            yield from _records_jsonl(path, tolerant)
        elif fmt == "parquet":
            yield from _records_parquet(path, fields, required)
        else:
            yield from stream_records(path)


@contextmanager
def read_errors(path: str):
    """A file that cannot be read or is not UTF-8, as one line naming it — for every reader of a data file
    (records here, a corpus's documents in corpus/sources.py)."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


def _records_jsonl(path: str, tolerant: bool):
    with open_bytes(path) as f:
        for row, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problem = f"not valid UTF-8 ({exc.reason} at byte {exc.start} of the line)"
                if tolerant:
                    bad = BadRow(problem)
                    try:
                        salvaged = json.loads(raw.decode("utf-8", errors="replace"))
                        bad.record = salvaged if isinstance(salvaged, dict) else None
                    except json.JSONDecodeError:
                        pass
                    yield row, bad
                    continue
            else:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    problem = None if isinstance(record, dict) else "expected a JSON object"
                except json.JSONDecodeError as exc:
                    problem = f"invalid JSON ({exc.msg})"
            if problem is None:
                yield row, record
            elif tolerant:
                yield row, BadRow(problem)
            else:
                raise UserError(f"{path} row {row}: {problem}")


def _utf8_problem(record: dict) -> Optional[str]:
    for key, value in record.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a byte that was no UTF-8, kept as a lone surrogate
                return f"not valid UTF-8 (column {key})"
    return None


def _records_delimited(path: str, fields, delimiter: str, tolerant: bool = False):
    csv.field_size_limit(1 << 30)
    with open_text(path, errors="surrogateescape" if tolerant else "strict") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if reader.fieldnames is None:
            return
        missing = [c for c in fields or [] if c not in reader.fieldnames]
        if missing:
            raise UserError(f"{path}: no column '{missing[0]}' (columns: {', '.join(reader.fieldnames)})")
        for row, record in enumerate(reader, 1):
            problem = _utf8_problem(record) if tolerant else None
            yield row, (BadRow(problem) if problem else record)


def _records_parquet(path: str, fields, required):
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    missing = [c for c in required if c not in pf.schema_arrow.names]
    if missing:
        raise UserError(f"{path}: no column '{missing[0]}' (columns: {', '.join(pf.schema_arrow.names)})")
    row = 0
    columns = [c for c in fields if c in pf.schema_arrow.names] if fields else None
    for batch in pf.iter_batches(columns=columns, batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield row, record
