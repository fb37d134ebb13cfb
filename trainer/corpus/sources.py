"""Read raw documents from txt / jsonl / csv / tsv / parquet (optionally .gz), globs, the HF hub, or the builtin corpus.

Streams documents one at a time: a corpus never has to fit in memory."""
from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
from pathlib import Path
from typing import Iterator, Optional

from ..config import CorpusSource
from ..errors import UserError
from .builtin import BUILTIN_PREFIX, builtin_digest, builtin_documents

_EXTS = {".txt": "txt", ".text": "txt", ".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
         ".parquet": "parquet"}


def source_paths(src: CorpusSource) -> list[str]:
    """Expand globs; a name that is no file and matches nothing is taken as a hub dataset when format allows."""
    patterns = src.path if isinstance(src.path, list) else [src.path]
    if not patterns or any(not isinstance(p, str) or not p for p in patterns):
        raise UserError("corpus source needs a non-empty 'path'")
    out: list[str] = []
    for pat in patterns:
        if pat.startswith(BUILTIN_PREFIX) or src.format == "hub":
            out.append(pat)
            continue
        matches = sorted(glob.glob(os.path.expanduser(pat), recursive=True))
        if not matches:
            if src.format == "auto" and _looks_like_hub_name(pat):
                out.append(pat)
                continue
            raise UserError(f"corpus file not found: {pat}")
        out += [m for m in matches if os.path.isfile(m)]
    return out


def _looks_like_hub_name(name: str) -> bool:
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


def _open_bytes(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _open_text(path: str, errors: str = "strict") -> io.TextIOBase:
    return io.TextIOWrapper(_open_bytes(path), encoding="utf-8", errors=errors, newline="")


def iter_documents(src: CorpusSource) -> Iterator[str]:
    """All documents of one source, in a fixed order. Empty texts are skipped."""
    for path in source_paths(src):
        fmt = file_format(path, src.format)
        try:  # (record formats report these themselves, with the row)
            yield from (d for d in _READERS[fmt](path, src) if d and not d.isspace())
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        except (OSError, EOFError) as exc:
            raise UserError(f"{path}: cannot read ({exc})") from None


def _read_txt(path: str, src: CorpusSource):
    with _open_text(path) as f:
        if src.doc_separator == "line":
            for line in f:
                yield line.strip()
            return
        para: list[str] = []
        for line in f:
            if line.strip():
                para.append(line.strip())
            elif para:
                yield " ".join(para)
                para = []
        if para:
            yield " ".join(para)


def _field(record: dict, field: str, path: str, row: int) -> str:
    if field not in record:
        raise UserError(f"{path} row {row}: no field '{field}' (fields: {', '.join(map(str, record))})")
    value = record[field]
    return value if isinstance(value, str) else ("" if value is None else str(value))


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
    try:
        if fmt in ("csv", "tsv"):
            yield from _records_delimited(path, required, "," if fmt == "csv" else "\t", tolerant)
        elif fmt == "jsonl":
            yield from _records_jsonl(path, tolerant)
        else:
            yield from _RECORD_READERS[fmt](path, fields, required)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


def _records_jsonl(path: str, tolerant: bool):
    with _open_bytes(path) as f:
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
    with _open_text(path, errors="surrogateescape" if tolerant else "strict") as f:
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


def _records_hub(spec: str, fields, required=()):
    """`spec` is `name` or `name::split` (and `name:config::split`)."""
    import datasets
    name, _, split = spec.partition("::")
    name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=True)
    except Exception as exc:  # offline, unknown name, gated …: all user-facing
        raise UserError(f"cannot load hub dataset '{name}' (split {split or 'train'}): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    yield from enumerate(ds, 1)


_RECORD_READERS = {
    "parquet": _records_parquet, "hub": _records_hub,
}


def _read_records(path: str, src: CorpusSource):
    spec = path
    if file_format(path, src.format) == "hub":
        spec = f"{path}{':' + src.hub_config if src.hub_config else ''}::{src.hub_split}"
    for row, record in iter_records(spec, file_format(path, src.format), [src.text_field]):
        yield _field(record, src.text_field, path, row)


def _read_builtin(path: str, src: CorpusSource):
    return builtin_documents(path[len(BUILTIN_PREFIX):])


_READERS = {"txt": _read_txt, "builtin": _read_builtin,
            **{fmt: _read_records for fmt in ("jsonl", "csv", "tsv", "parquet", "hub")}}


def fingerprint(src: CorpusSource) -> list:
    """What identifies a source's content for the cache key: path, size and mtime of each file."""
    out = []
    for path in source_paths(src):
        if os.path.isfile(path):
            st = os.stat(path)
            out.append([os.path.abspath(path), st.st_size, int(st.st_mtime)])
        elif path.startswith(BUILTIN_PREFIX):  # generated by code: the code is its content
            out.append([path, builtin_digest()])
        else:
            out.append([path, src.hub_config, src.hub_split])
    return out + [src.text_field, src.format, src.doc_separator]
