"""Raw-text sources and corpus preparation (tokenize + pack into [CLS] … [SEP] rows of seq_len)."""
from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest

from conftest import shared_data
from log_lines import logged
from trainer.config import CorpusSource
from trainer.corpus import prepare as prepare_mod
from trainer.corpus.prepare import cache_key, prepare_corpus
from trainer.corpus.sources import iter_documents
from trainer.data.builtin import grammar_documents
from trainer.errors import UserError

DOCS = [
    "The striker scored the final goal.",
    "A chef baked fresh bread, with butter!",
    "Üñïcödé text: naïve café — ok.",
    "the researcher measured the reaction rate carefully in the laboratory",
]


def _docs(**kw):
    return list(iter_documents(CorpusSource(**kw)))


def _rows(prepared) -> np.ndarray:
    seq_len = prepared.meta["seq_len"]
    parts = [np.fromfile(path, dtype=prepared.meta["dtype"]).reshape(rows, seq_len) for path, rows in prepared.shards()]
    return np.concatenate(parts).astype(np.int64)


def _encode(tok, docs):
    return [tok(d, add_special_tokens=False)["input_ids"] for d in docs]


def _check_packing(rows: np.ndarray, doc_ids: list[list[int]], seq_len: int, cls: int, sep: int, pad: int):
    """Rows are `[CLS] body [SEP]` (+ padding on the last row only); the bodies, read in order, hold every token of
    every document in order, consecutive documents separated by one [SEP] — except where a document ends exactly at
    a row end, where the row's own closing [SEP] is the boundary."""
    assert rows.ndim == 2 and rows.shape[1] == seq_len
    body = seq_len - 2
    stream: list[int] = []
    row_ends = set()
    for i, row in enumerate(rows):
        assert row[0] == cls, f"row {i} does not start with [CLS]"
        real = row[row != pad]
        n_pad = seq_len - real.size
        if i < len(rows) - 1:
            assert n_pad == 0, f"row {i} is not the last row but holds padding"
        assert (row[real.size:] == pad).all(), f"row {i}: padding is not at the end"
        assert real[-1] == sep, f"row {i} does not end with [SEP]"
        assert cls not in real[1:], f"row {i}: [CLS] inside the body"
        stream.extend(real[1:-1].tolist())
        row_ends.add(len(stream))
        if i < len(rows) - 1:
            assert real.size == seq_len
    assert len(stream) <= body * len(rows)
    ptr = 0
    for d, ids in enumerate(doc_ids):
        assert stream[ptr:ptr + len(ids)] == ids, f"document {d} not found in order at stream offset {ptr}"
        ptr += len(ids)
        if d == len(doc_ids) - 1:
            break
        if ptr in row_ends:
            continue  # boundary on a row end: the row's own [SEP] marks it (the next row starts with the next doc)
        assert stream[ptr] == sep, f"no [SEP] between documents {d} and {d + 1}"
        ptr += 1
    assert ptr == len(stream), "tokens after the last document"


def _special_ids(tok):
    return tok.cls_token_id, tok.sep_token_id, tok.pad_token_id


# ----------------------------------------------------------------------------- sources
def test_txt_line_separator(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first doc\n\n  second doc  \r\n   \nthird\n", encoding="utf-8")
    assert _docs(path=str(p)) == ["first doc", "second doc", "third"]


def test_txt_blank_separator(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("para one\nline two\n\n\n\npara two\n  \nlast\nend", encoding="utf-8")
    assert _docs(path=str(p), doc_separator="blank") == ["para one line two", "para two", "last end"]


def test_jsonl(tmp_path):
    p = tmp_path / "a.jsonl"
    rows = [{"text": d, "label": i} for i, d in enumerate(DOCS)]
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    assert _docs(path=str(p)) == DOCS


def test_jsonl_custom_field_and_empty_values_skipped(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in [{"body": "x y"}, {"body": ""}, {"body": None}, {"body": "z"}]))
    assert _docs(path=str(p), text_field="body") == ["x y", "z"]


def test_jsonl_missing_field_names_file_and_row(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "no text"}) + "\n")
    with pytest.raises(UserError) as exc:
        _docs(path=str(p))
    msg = str(exc.value)
    assert str(p) in msg and "row 2" in msg and "'text'" in msg


def test_jsonl_invalid_json_names_row(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(UserError, match=r"row 2"):
        _docs(path=str(p))


def test_csv_and_tsv(tmp_path):
    import csv
    for name, delim in (("a.csv", ","), ("a.tsv", "\t")):
        p = tmp_path / name
        with open(p, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter=delim)
            w.writerow(["id", "text"])
            for i, d in enumerate(DOCS + ["multi\nline, \"quoted\"\tfield"]):
                w.writerow([i, d])
        assert _docs(path=str(p)) == DOCS + ["multi\nline, \"quoted\"\tfield"], name


def test_csv_missing_column_names_file_and_column(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("id,body\n1,hello\n")
    with pytest.raises(UserError) as exc:
        _docs(path=str(p))
    assert str(p) in str(exc.value) and "'text'" in str(exc.value)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": DOCS + [None], "n": list(range(len(DOCS) + 1))}), p, row_group_size=2)
    assert _docs(path=str(p)) == DOCS
    with pytest.raises(UserError, match="'body'") as exc:
        _docs(path=str(p), text_field="body")
    assert str(p) in str(exc.value)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv"])
def test_gzip(tmp_path, fmt):
    p = tmp_path / f"a.{fmt}.gz"
    if fmt == "txt":
        payload = "\n".join(DOCS)
    elif fmt == "jsonl":
        payload = "\n".join(json.dumps({"text": d}) for d in DOCS)
    else:
        payload = "text\n" + "\n".join(f'"{d}"' for d in DOCS)
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write(payload)
    assert _docs(path=str(p)) == DOCS


def test_corrupt_gzip_is_user_error(tmp_path):
    p = tmp_path / "a.txt.gz"
    p.write_bytes(b"this is not gzip data at all")
    with pytest.raises(UserError, match="cannot read"):
        _docs(path=str(p))


def test_glob_sorted_and_list_of_paths(tmp_path):
    for name in ("b.txt", "a.txt", "c.txt"):
        (tmp_path / name).write_text(f"doc {name}\n")
    (tmp_path / "sub.txt").mkdir()  # directories matched by the glob are ignored
    assert _docs(path=str(tmp_path / "*.txt")) == ["doc a.txt", "doc b.txt", "doc c.txt"]
    assert _docs(path=[str(tmp_path / "c.txt"), str(tmp_path / "a.txt")]) == ["doc c.txt", "doc a.txt"]


def test_explicit_format_overrides_extension(tmp_path):
    p = tmp_path / "data.dat"
    p.write_text(json.dumps({"text": "hello"}) + "\n")
    assert _docs(path=str(p), format="jsonl") == ["hello"]
    with pytest.raises(UserError, match="cannot tell the format"):
        _docs(path=str(p))


@pytest.mark.parametrize("name", ["nope.txt", "nope.jsonl.gz", "dir/*.txt"])
def test_missing_file(tmp_path, name):
    with pytest.raises(UserError, match="not found"):
        _docs(path=str(tmp_path / name))


def test_empty_path_refused():
    with pytest.raises(UserError, match="path"):
        _docs(path="")


def test_non_utf8(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"good line\nbad \xff\xfe bytes\n")
    with pytest.raises(UserError, match="UTF-8") as exc:
        _docs(path=str(p))
    assert str(p) in str(exc.value)


def test_builtin_source():
    docs = _docs(path="builtin:grammar")
    assert len(docs) == 4000 and docs[:3] == list(grammar_documents())[:3]
    with pytest.raises(UserError, match="builtin:grammar"):
        _docs(path="builtin:nope")


# ----------------------------------------------------------------------------- prepare
def test_empty_corpus_error(tmp_path, tiny_tokenizer, corpus_cache):
    p = tmp_path / "empty.txt"
    p.write_text("\n   \n\n")
    with pytest.raises(UserError, match="no documents"):
        prepare_corpus(CorpusSource(path=str(p)), tiny_tokenizer, 32, corpus_cache)
    assert list(corpus_cache.iterdir()) == []  # the temp dir is cleaned up


@pytest.mark.parametrize("seq_len", [8, 16, 33])
def test_packing_small(tmp_path, tiny_tokenizer, corpus_cache, seq_len):
    docs = [" ".join(f"the chef baked bread number {i}" for _ in range(1 + i % 4)) for i in range(40)]
    docs += ["a", "the striker"]  # very short docs too
    p = tmp_path / "a.txt"
    p.write_text("\n".join(docs))
    prepared = prepare_corpus(CorpusSource(path=str(p)), tiny_tokenizer, seq_len, corpus_cache)
    rows = _rows(prepared)
    cls, sep, pad = _special_ids(tiny_tokenizer)
    ids = _encode(tiny_tokenizer, docs)
    _check_packing(rows, ids, seq_len, cls, sep, pad)
    assert prepared.rows == len(rows)
    assert prepared.meta["documents"] == len(docs)
    assert prepared.meta["doc_tokens"] == sum(map(len, ids))
    assert (prepared.meta["cls_id"], prepared.meta["sep_id"], prepared.meta["pad_id"]) == (cls, sep, pad)


def test_packing_boundary_on_row_end(tmp_path, tiny_tokenizer, corpus_cache):
    """Documents whose lengths make boundaries land exactly on row ends and on the last body position."""
    tok = tiny_tokenizer
    word = "the"
    assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1
    seq_len = 10  # body 8
    lengths = [8, 8, 7, 3, 4, 1, 16, 2, 5]
    docs = [" ".join([word] * n) for n in lengths]
    p = tmp_path / "a.txt"
    p.write_text("\n".join(docs))
    rows = _rows(prepare_corpus(CorpusSource(path=str(p)), tok, seq_len, corpus_cache))
    _check_packing(rows, _encode(tok, docs), seq_len, *_special_ids(tok))
    # doc 0 fills row 0 exactly: row 1 must start with doc 1, not with a stray [SEP]
    assert rows[1][1] != tok.sep_token_id


def test_last_row_padded(tmp_path, tiny_tokenizer, corpus_cache):
    p = tmp_path / "a.txt"
    p.write_text("the chef baked bread\n")
    rows = _rows(prepare_corpus(CorpusSource(path=str(p)), tiny_tokenizer, 32, corpus_cache))
    ids = tiny_tokenizer("the chef baked bread", add_special_tokens=False)["input_ids"]
    cls, sep, pad = _special_ids(tiny_tokenizer)
    assert rows.tolist() == [[cls, *ids, sep] + [pad] * (32 - len(ids) - 2)]


@pytest.fixture(scope="module")
def builtin_prepared(tiny_tokenizer, tmp_path_factory):
    cache = tmp_path_factory.mktemp("builtin-cache")
    return prepare_corpus(CorpusSource(path="builtin:grammar"), tiny_tokenizer, 64, cache)


def test_builtin_corpus_packing_and_density(builtin_prepared, tiny_tokenizer):
    rows = _rows(builtin_prepared)
    docs = list(grammar_documents())
    _check_packing(rows, _encode(tiny_tokenizer, docs), 64, *_special_ids(tiny_tokenizer))
    real = (rows != tiny_tokenizer.pad_token_id).mean()
    assert real > 0.99, real
    assert builtin_prepared.meta["dtype"] == "uint16"


def test_cache_reuse(tmp_path, tiny_tokenizer, corpus_cache, monkeypatch):
    p = tmp_path / "a.txt"
    p.write_text("\n".join(DOCS))
    src = CorpusSource(path=str(p))
    with logged() as logs:
        first = prepare_corpus(src, tiny_tokenizer, 16, corpus_cache)
    assert len(logs) == 1 and first.path.parent == corpus_cache
    mtimes = {f: f.stat().st_mtime_ns for f in first.path.iterdir()}

    def no_build(*a, **k):
        raise AssertionError("rebuilt a cached corpus")

    monkeypatch.setattr(prepare_mod, "_build", no_build)
    with logged() as logs:
        second = prepare_corpus(src, tiny_tokenizer, 16, corpus_cache)
    assert second.path == first.path and second.meta == first.meta
    assert {f: f.stat().st_mtime_ns for f in second.path.iterdir()} == mtimes
    assert logs == []
    # a different seq_len is a different corpus
    monkeypatch.undo()
    third = prepare_corpus(src, tiny_tokenizer, 32, corpus_cache)
    assert third.path != first.path and third.meta["seq_len"] == 32
    assert sorted(x.name for x in corpus_cache.iterdir()) == sorted([first.path.name, third.path.name])


def test_default_cache_dir_follows_env(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("BERT_RECIPE_CACHE", str(tmp_path / "envcache"))
    p = tmp_path / "a.txt"
    p.write_text("hello there\n")
    prepared = prepare_corpus(CorpusSource(path=str(p)), tiny_tokenizer, 16)
    assert prepared.path.parent == tmp_path / "envcache"


def test_cache_key_changes(tmp_path, tiny_tokenizer):
    p = tmp_path / "a.txt"
    p.write_text("hello there\n")
    src = CorpusSource(path=str(p))
    k = cache_key(src, tiny_tokenizer, 64)
    assert k == cache_key(CorpusSource(path=str(p)), tiny_tokenizer, 64)
    assert k == cache_key(CorpusSource(path=str(p), weight=3.0), tiny_tokenizer, 64)  # weight: not content
    assert k != cache_key(src, tiny_tokenizer, 128)
    assert k != cache_key(CorpusSource(path=str(p), doc_separator="blank"), tiny_tokenizer, 64)
    assert k != cache_key(CorpusSource(path=str(p), format="txt"), tiny_tokenizer, 64)
    p.write_text("hello there, a longer file\n")  # size changes
    assert k != cache_key(src, tiny_tokenizer, 64)


def test_num_proc_identical_shards(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(prepare_mod, "DOCS_PER_BATCH", 64)  # several batches through the pool
    monkeypatch.setattr(prepare_mod, "SHARD_ROWS", 100)  # several shards
    p = tmp_path / "a.txt"
    p.write_text("\n".join(list(grammar_documents(600, seed=5))))
    src = CorpusSource(path=str(p))
    one = prepare_corpus(src, tiny_tokenizer, 32, tmp_path / "c1", num_proc=1)
    two = prepare_corpus(src, tiny_tokenizer, 32, tmp_path / "c2", num_proc=2)
    assert len(one.shards()) > 1
    assert [n for n, _ in one.meta["shards"]] == [n for n, _ in two.meta["shards"]]
    assert sorted(os.listdir(one.path)) == sorted(os.listdir(two.path))  # no leftover tokenizer dir
    for (a, ra), (b, rb) in zip(one.shards(), two.shards()):
        assert ra == rb and a.read_bytes() == b.read_bytes()
    assert {k: v for k, v in one.meta.items()} == two.meta


def test_multiple_shards_hold_all_rows(tmp_path, tiny_tokenizer, corpus_cache, monkeypatch):
    monkeypatch.setattr(prepare_mod, "SHARD_ROWS", 7)
    docs = list(grammar_documents(60, seed=3))
    p = tmp_path / "a.txt"
    p.write_text("\n".join(docs))
    prepared = prepare_corpus(CorpusSource(path=str(p)), tiny_tokenizer, 16, corpus_cache)
    assert all(r == 7 for _, r in prepared.meta["shards"][:-1]) and len(prepared.shards()) > 2
    assert prepared.rows == sum(r for _, r in prepared.meta["shards"])
    _check_packing(_rows(prepared), _encode(tiny_tokenizer, docs), 16, *_special_ids(tiny_tokenizer))


# ----------------------------------------------------------------------------- a real corpus
def test_real_corpus_imdb_subset(tmp_path, tiny_tokenizer, corpus_cache):
    source = shared_data() / "imdb" / "unsup.jsonl.gz"
    if not source.is_file():
        pytest.skip(f"{source} not present")
    texts = []
    with gzip.open(source, "rt", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == 2000:
                break
    subset = tmp_path / "imdb_subset.jsonl.gz"
    with gzip.open(subset, "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    src = CorpusSource(path=str(subset), text_field="text")
    docs = list(iter_documents(src))
    assert docs == [t for t in texts if t and not t.isspace()]
    prepared = prepare_corpus(src, tiny_tokenizer, 128, corpus_cache)
    rows = _rows(prepared)
    _check_packing(rows, _encode(tiny_tokenizer, docs), 128, *_special_ids(tiny_tokenizer))
    assert prepared.meta["documents"] == len(docs)
    assert (rows != tiny_tokenizer.pad_token_id).mean() > 0.99


def test_literal_special_token_text_is_not_special(tmp_path, tiny_tokenizer, corpus_cache):
    tok = tiny_tokenizer
    docs = ["the chef wrote [PAD] and [CLS] and [MASK] on the board", "the striker said [SEP] twice [SEP]"]
    p = tmp_path / "a.txt"
    p.write_text("\n".join(docs))
    rows = _rows(prepare_corpus(CorpusSource(path=str(p)), tok, 64, corpus_cache))
    assert len(rows) == 1
    real = rows[0][rows[0] != tok.pad_token_id]
    assert real.size == int(np.flatnonzero(rows[0] != tok.pad_token_id).max()) + 1  # no [PAD] inside
    body = real[1:-1]
    assert not np.isin(body, [tok.cls_token_id, tok.mask_token_id]).any()
    assert int((body == tok.sep_token_id).sum()) == 1  # only the document boundary
