"""Fine-tuning data prepared once into a memory-mapped store (issue #10), as a user meets it.

Store (in process): one entry per split, built once, found again by later runs and every truncation strategy;
pieces are the tokenizer's, untruncated; a damaged entry or mixed label types are refused. Hub layout written
locally with `datasets` keeps its ClassLabel names up to the exported model. Launched runs: a second run (another
strategy) prepares nothing, 2 ranks prepare each split once, a damaged cache stops a run before it replaces
anything. predict.py: formats, pass-through columns, bad rows, 1 vs 2 processes. finetune.py --eval-only."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launching import REPO, env, error_lines, free_port, log_messages, metrics, run
from log_lines import logged
from tiny_data import LABELS, TINY, data_overrides, rows, tiny_splits, write_jsonl
from trainer.config import ClassificationDataConfig, TextConfig
from trainer.errors import UserError
from trainer.text.sources import source_of
from trainer.text.store import prepare_split
from trainer.text.tasks import load_task
from trainer.text.truncation import Encoder, encoded_stats

FT = dict(script="finetune.py", config="configs/finetune/tiny.yaml")


# ----------------------------------------------------------------------------- helpers
class Log(list):
    """The messages the trainer logged inside `with log:` blocks."""

    def __enter__(self):
        self._logged = logged()
        self._lines = self._logged.__enter__()
        return self

    def __exit__(self, *exc):
        self._logged.__exit__(*exc)
        self.extend(self._lines)

    def prepared(self) -> list:
        return [line for line in self if line.startswith("prepared ")]


def prepared_lines(stdout: str) -> list:
    """The "prepared …" messages of a run's job log."""
    return [m for m in log_messages(stdout) if m.startswith("prepared ")]


def entries(cache: Path) -> list:
    return sorted(p.name for p in cache.glob("cls-*"))


def leftovers(cache: Path) -> list:
    """Temp dirs and locks of preparers: none once every preparer is done."""
    return sorted(p.name for p in cache.iterdir() if p.name.startswith("."))


def prepare(path: Path, tok, cache: Path, log=None, tolerant=False, **cfg):
    c = ClassificationDataConfig(**cfg)
    with log if log is not None else Log():
        return prepare_split(source_of(str(path), c, "train"), list(c.text_fields), c.label_field, tok, cache,
                             tolerant=tolerant)


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def entry_of(cache: Path, source: Path) -> Path:
    found = [p for p in cache.glob("cls-*") if json.loads((p / "meta.json").read_text())["source"] == str(source)]
    assert len(found) == 1, found
    return found[0]


def long_text(n_words: int) -> str:
    words = "ball goal team match player score bread cheese soup computer code server".split()
    return " ".join(words[i % len(words)] + ("s" if i % 5 == 0 else "") for i in range(n_words))


# ============================================================================= 1. the store, in process
def test_a_split_is_prepared_once_and_mapped_after(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", rows(20, 1))
    cache = tmp_path / "cache"
    log1 = Log()
    first = prepare(path, tiny_tokenizer, cache, log1)
    assert len(log1.prepared()) == 1 and str(path) in log1.prepared()[0]
    log2 = Log()
    second = prepare(path, tiny_tokenizer, cache, log2)
    assert log2.prepared() == [], "the second call prepared the split again"
    assert second.path == first.path and entries(cache) == [first.path.name]
    assert [second.pieces(i) for i in range(second.n)] == [first.pieces(i) for i in range(first.n)]
    assert leftovers(cache) == []


def test_a_changed_file_gets_a_new_entry(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", rows(20, 1))
    cache = tmp_path / "cache"
    old = prepare(path, tiny_tokenizer, cache)
    new_rows = rows(20, 1)
    new_rows[0] = {"text": "computer chip network", "label": "tech"}
    write_jsonl(path, new_rows)  # new content (and size / mtime)
    log = Log()
    new = prepare(path, tiny_tokenizer, cache, log)
    assert len(log.prepared()) == 1 and new.path != old.path
    assert new.pieces(0) == (tiny_tokenizer("computer chip network", add_special_tokens=False)["input_ids"],)
    st = path.stat()  # same bytes, only touched: the source may have changed, so it is read again
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    log = Log()
    touched = prepare(path, tiny_tokenizer, cache, log)
    assert len(log.prepared()) == 1 and touched.path not in (old.path, new.path)
    assert len(entries(cache)) == 3


def test_pieces_are_the_tokenizers_stored_before_truncation(tiny_tokenizer, tmp_path):
    texts = ["ball goal", "a long one: " + long_text(700), "ünïcode café data", "x"]
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(texts)])
    store = prepare(path, tiny_tokenizer, tmp_path / "cache")
    expected = [tiny_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len(expected[1]) > 700  # far beyond any max_len: nothing cut when stored
    assert [store.pieces(i) for i in range(store.n)] == [(e,) for e in expected]
    assert store.piece_lengths(0).tolist() == [len(e) for e in expected]
    assert isinstance(store.tokens[0], np.memmap) and store.tokens[0].dtype == np.uint16
    assert np.asarray(store.row).tolist() == [1, 2, 3, 4]
    assert [store.label_values[y] for y in store.label] == [0, 1, 0, 1]


@pytest.mark.parametrize("text_cfg", [
    TextConfig(strategy="head", max_len=16), TextConfig(strategy="tail", max_len=16),
    TextConfig(strategy="head_tail", max_len=16, head_tokens=5), TextConfig(strategy="hierarchical", max_len=16,
                                                                            max_chunks=3),
    TextConfig(strategy="head", max_len=40)], ids=lambda c: f"{c.strategy}-{c.max_len}")
def test_one_entry_per_split_serves_every_strategy_and_max_len(tiny_tokenizer, tmp_path, text_cfg):
    texts = {"train": [long_text(k) for k in (3, 10, 30, 60, 90, 7)], "test": [long_text(k) for k in (50, 2)]}
    files = {s: write_jsonl(tmp_path / f"{s}.jsonl", [{"text": t, "label": ["a", "b"][i % 2]}
                                                      for i, t in enumerate(ts)]) for s, ts in texts.items()}
    cfg = ClassificationDataConfig(train=str(files["train"]), dev=str(files["train"]), test=str(files["test"]))
    cache = tmp_path / "cache"
    with Log() as log:
        splits, vocab = load_task(cfg, 0, tiny_tokenizer, cache)  # stage 1
    assert len(log.prepared()) == 2  # train (read once, also as dev) and test
    with Log() as log:
        splits, vocab = load_task(cfg, 1, tiny_tokenizer, cache)  # a later stage / run, another strategy
    assert log.prepared() == [] and len(entries(cache)) == 2
    cls, sep, budget = tiny_tokenizer.cls_token_id, tiny_tokenizer.sep_token_id, text_cfg.max_len - 2
    encoder = Encoder(tiny_tokenizer, text_cfg)
    for name, split in (("train", splits["train"]), ("test", splits["test"])):
        for j in range(len(split)):
            ids = tiny_tokenizer(texts[name][int(split.idx[j])], add_special_tokens=False)["input_ids"]
            if text_cfg.strategy == "head":
                want = [ids[:budget]]
            elif text_cfg.strategy == "tail":
                want = [ids[-budget:]]
            elif text_cfg.strategy == "head_tail":
                tail = budget - text_cfg.head_tokens
                want = [ids if len(ids) <= budget else ids[:text_cfg.head_tokens] + ids[-tail:]]
            else:
                want = [ids[i:i + budget] for i in range(0, len(ids), budget)][:text_cfg.max_chunks]
            got = encoder.encode_pieces(split.pieces(j))
            assert [chunk for chunk, _ in got] == [[cls, *w, sep] for w in want], (name, j)
        n_tokens, n_chunks, _ = encoded_stats(split.piece_lengths(), text_cfg)
        assert n_tokens.tolist() == [sum(len(c) for c, _ in encoder.encode_pieces(split.pieces(j)))
                                     for j in range(len(split))]


def test_examples_are_numpy_index_arrays_over_the_store(tiny_tokenizer, tmp_path):
    data = rows(40, 1)
    path = write_jsonl(tmp_path / "train.jsonl", data)
    cfg = ClassificationDataConfig(train=str(path), dev=None, dev_ratio=0.25)
    splits, vocab = load_task(cfg, 0, tiny_tokenizer, tmp_path / "cache")
    assert vocab == LABELS
    train, dev = splits["train"], splits["dev"]
    for ex in (train, dev):
        assert isinstance(ex.idx, np.ndarray) and ex.idx.dtype == np.int32  # 4 bytes per example
        assert isinstance(ex.labels, np.ndarray) and ex.labels.dtype == np.int32
        assert len(ex.idx) == len(ex.labels) == len(ex)
        assert ex.store is train.store  # the carved dev split is rows of the same mapped store
        source_rows = np.asarray(ex.store.row)[ex.idx]
        assert [vocab[y] for y in ex.labels] == [data[r - 1]["label"] for r in source_rows]
    assert sorted(np.concatenate([train.idx, dev.idx]).tolist()) == list(range(40))
    assert len(dev) == 10


def test_a_damaged_entry_is_refused_and_can_be_prepared_anew(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", rows(20, 1))
    cache = tmp_path / "cache"
    good = prepare(path, tiny_tokenizer, cache)
    expected = [good.pieces(i) for i in range(good.n)]
    tok = good.path / "tok_0.bin"
    with open(tok, "r+b") as f:
        f.truncate(tok.stat().st_size // 2)
    with pytest.raises(UserError, match="damaged") as err:
        prepare(path, tiny_tokenizer, cache)
    assert str(good.path) in str(err.value) and "tok_0.bin" in str(err.value)
    (good.path / "tok_0.bin").unlink()
    with pytest.raises(UserError, match="damaged"):
        prepare(path, tiny_tokenizer, cache)
    shutil.rmtree(good.path)  # what the message says to do
    again = prepare(path, tiny_tokenizer, cache)
    assert [again.pieces(i) for i in range(again.n)] == expected


def test_mixed_label_types_name_both_rows_and_leave_no_entry(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "ball goal", "label": 1}, {"text": "soup", "label": 0},
                                                  {"text": "cheese", "label": 1}, {"text": "chip", "label": "pos"}])
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="mixed label types") as err:
        prepare(path, tiny_tokenizer, cache)
    assert "row 1" in str(err.value) and "row 4" in str(err.value) and "'pos'" in str(err.value)
    assert entries(cache) == [] and leftovers(cache) == []


def test_a_file_of_bad_rows_only_is_prepared_tolerantly(tiny_tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "unfinished\n' + '{"text": "caf\xe9"}\n'.encode("latin-1") +
                     b'{"text": "   ", "label": "food"}\n[1, 2]\n')
    with pytest.raises(UserError, match="row 1: invalid JSON"):
        prepare(path, tiny_tokenizer, tmp_path / "strict")
    store = prepare(path, tiny_tokenizer, tmp_path / "cache", tolerant=True)
    assert store.n == 4
    assert [b["row"] for b in store.bad_rows()] == [1, 2, 3, 4]
    problems = [b["problem"] for b in store.bad_rows()]
    assert "invalid JSON" in problems[0] and "UTF-8" in problems[1] and "empty text" in problems[2]
    assert [store.pieces(i) for i in range(4)] == [([],)] * 4
    assert np.asarray(store.label).tolist() == [-1] * 4


# ============================================================================= 2. hub layout written locally
def class_label_dataset(n: int, seed: int):
    import datasets
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    data = rows(n, seed)
    return datasets.Dataset.from_dict({"text": [r["text"] for r in data],
                                       "label": [0 if r["label"] == "food" else 1 for r in data]}, features=features)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hub")
    folder = root / "topics"
    (folder / "data").mkdir(parents=True)
    class_label_dataset(40, 1).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    test = class_label_dataset(10, 3)
    test.to_parquet(str(folder / "data" / "test-00000-of-00001.parquet"))
    test.to_parquet(str(root / "test.parquet"))
    return {"folder": folder, "file": root / "test.parquet", "test_labels": list(test["label"])}


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def test_hub_layout_folder_trains_and_exports_class_names(hub, tmp_path, offline_datasets):
    out, cache = tmp_path / "run", tmp_path / "cache"
    proc = run(None, out, f"data.train={hub['folder']}", f"data.test={hub['folder']}", *TINY, cache=cache,
               timeout=300, **FT)
    assert "labels ['neg', 'pos']" in proc.stdout
    config = json.loads((out / "hf_model" / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    assert config["label2id"] == {"neg": 0, "pos": 1}
    assert json.loads((out / "hf_model" / "bert_recipe.json").read_text())["labels"] == ["neg", "pos"]
    results = json.loads((out / "eval_results.json").read_text())
    assert set(results) == {"dev", "test"}
    gold = np.bincount(hub["test_labels"], minlength=2).tolist()
    assert results["test"]["n"] == 10 and [sum(r) for r in results["test"]["confusion_matrix"]] == gold
    assert results["dev"]["n"] == 4  # carved: 10 % of the 40 training rows
    assert len(entries(cache)) == 2  # train and test of the folder, each prepared once

    # predicting a parquet file written by `datasets`: its ClassLabel ids are scored as the names they carry
    preds = tmp_path / "preds.jsonl"
    proc = predict(out / "hf_model", hub["file"], preds, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    labels = [json.loads(line)["label"] for line in preds.read_text().splitlines()]
    assert set(labels) <= {"neg", "pos"} and len(labels) == 10
    m = json.loads(Path(f"{preds}.metrics.json").read_text())
    assert m["n"] == 10 and m["unknown_labels"] == 0
    names = ["neg", "pos"]
    assert m["accuracy"] == pytest.approx(np.mean([p == names[g] for p, g in zip(labels, hub["test_labels"])]))


def test_single_parquet_file_written_by_datasets_keeps_class_names(hub, tiny_tokenizer, tmp_path):
    cfg = ClassificationDataConfig(train=str(hub["file"]), dev=str(hub["file"]))
    splits, vocab = load_task(cfg, 0, tiny_tokenizer, tmp_path / "cache")
    assert vocab == ["neg", "pos"]
    assert splits["train"].labels.tolist() == hub["test_labels"]
    import pyarrow as pa
    import pyarrow.parquet as pq
    plain = tmp_path / "plain.parquet"  # the same ids without the ClassLabel metadata: the ids are the labels
    pq.write_table(pa.table({"text": ["ball", "soup", "chip"], "label": [0, 1, 0]}), str(plain))
    _, vocab = load_task(ClassificationDataConfig(train=str(plain), dev=str(plain)), 0, tiny_tokenizer,
                         tmp_path / "cache")
    assert vocab == [0, 1]


# ============================================================================= 3./4. launched runs reuse the store
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return tiny_splits(tmp_path_factory.mktemp("data"))


def test_a_second_run_with_another_strategy_prepares_nothing(tmp_path, data):
    cache = tmp_path / "cache"
    first = run(None, tmp_path / "a", *data_overrides(data), *TINY, cache=cache, timeout=300, **FT)
    assert len(prepared_lines(first.stdout)) == 3, first.stdout
    second = run(None, tmp_path / "b", *data_overrides(data), *TINY, "text.strategy=hierarchical",
                 "text.max_len=16", "text.max_chunks=3", cache=cache, timeout=300, **FT)
    assert prepared_lines(second.stdout) == [], second.stdout
    assert "task: train 48 · dev 12 · test 9" in second.stdout
    results = json.loads((tmp_path / "b" / "eval_results.json").read_text())
    assert results["test"]["n"] == 9 and results["dev"]["n"] == 12
    assert len(entries(cache)) == 3


def test_two_ranks_prepare_each_split_once_and_train(tmp_path, data):
    cache, out = tmp_path / "cache", tmp_path / "run"
    run("cpu_ddp", out, *data_overrides(data), "train.max_steps=6", "train.eval_every=6", "train.log_every=1",
        cache=cache, timeout=400, **FT)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["dev"]["n"] == 12 and results["test"]["n"] == 9
    assert sum(map(sum, results["test"]["confusion_matrix"])) == 9
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 7))
    assert {r["world_size"] for r in metrics(out) if "world_size" in r} == {2}
    assert len(entries(cache)) == 3 and leftovers(cache) == []
    assert {json.loads((cache / e / "meta.json").read_text())["source"] for e in entries(cache)} == {
        str(data[s]) for s in ("train", "dev", "test")}


def test_a_damaged_cache_stops_a_run_before_it_replaces_anything(tmp_path, trained, cache, data):
    """A finished run in the output dir, --overwrite, and a cache entry of its training data damaged since."""
    own_cache, out = tmp_path / "cache", tmp_path / "run"
    shutil.copytree(cache, own_cache)
    shutil.copytree(trained, out)
    entry = entry_of(own_cache, data["train"])
    label = entry / "label.npy"
    with open(label, "r+b") as f:
        f.truncate(label.stat().st_size - 4)
    (out / "notes.txt").write_text("the user's own file\n")
    before = snapshot(out)
    proc = run(None, out, *data_overrides(data), *TINY, cache=own_cache, flags=["--overwrite"], check=False,
               timeout=300, **FT)
    errors = error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "damaged" in errors[0] and str(entry) in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert snapshot(out) == before, "the output dir changed"
    shutil.rmtree(entry)  # as the message advises: the next run prepares it anew
    proc = run(None, out, *data_overrides(data), *TINY, cache=own_cache, flags=["--overwrite"], timeout=300, **FT)
    assert [line.split(":")[0] for line in prepared_lines(proc.stdout)] == [f"prepared {data['train']}"]


# ============================================================================= 5. predict.py
def predict(model: Path, inp: Path, out: Path, cache: Path, *flags: str, processes: int = 1):
    if processes == 1:
        head = [sys.executable, str(REPO / "launch" / "predict.py")]
    else:
        head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "launch" / "accelerate" / "cpu_ddp.yaml"), "--num_processes", str(processes),
                "--main_process_port", str(free_port()), str(REPO / "launch" / "predict.py")]
    cmd = [*head, "--model", str(model), "--input", str(inp), "--output", str(out), *flags]
    return subprocess.run(cmd, cwd=REPO, env=env(cache), capture_output=True, text=True, timeout=300)


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache, data) -> Path:
    """A finished tiny run, trained long enough to tell the classes apart (not one label for every row)."""
    out = tmp_path_factory.mktemp("trained") / "out"
    run(None, out, *data_overrides(data), "train.max_steps=24", "train.eval_every=12", cache=cache,
        timeout=300, **FT)
    return out


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("labelled")
    records = [{"id": f"r{i:02d}", "text": r["text"], "label": r["label"], "n": i, "source": f"s{i % 4}"}
               for i, r in enumerate(rows(31, 11))]
    path = write_jsonl(d / "in.jsonl", records)
    with open(d / "in.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["id", "text", "label"], extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    return {"records": records, "jsonl": path, "csv": d / "in.csv"}


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, trained, cache, labelled) -> Path:
    """jsonl in → jsonl out, one process, id and two kept columns."""
    out = tmp_path_factory.mktemp("predicted") / "preds.jsonl"
    proc = predict(trained / "hf_model", labelled["jsonl"], out, cache, "--id_field", "id", "--keep", "n", "source")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_predict_jsonl_keeps_order_columns_and_scores_labels(predicted, labelled):
    preds, records = read_jsonl(predicted), labelled["records"]
    assert [p["id"] for p in preds] == [r["id"] for r in records]  # input order (prediction is length-sorted)
    assert [p["n"] for p in preds] == [r["n"] for r in records] and [p["source"] for p in preds] == [
        r["source"] for r in records]
    for p in preds:
        assert list(p) == ["id", "n", "source", "label", "probabilities"]
        assert list(p["probabilities"]) == LABELS
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
    assert len({p["label"] for p in preds}) > 1, "the trained model predicts one class only"
    m = json.loads(Path(f"{predicted}.metrics.json").read_text())
    assert m["n"] == 31 and m["labels"] == LABELS and m["unlabeled"] == 0
    assert m["accuracy"] == pytest.approx(np.mean([p["label"] == r["label"] for p, r in zip(preds, records)]))
    cm = np.array(m["confusion_matrix"])
    assert cm.sum() == 31 and cm.sum(1).tolist() == [sum(r["label"] == lab for r in records) for lab in LABELS]
    assert not Path(f"{predicted}.bad_rows.jsonl").exists()


def test_predict_csv_to_parquet_and_tsv(predicted, trained, cache, labelled, tmp_path):
    import pyarrow.parquet as pq
    reference = read_jsonl(predicted)
    pq_out, tsv_out = tmp_path / "preds.parquet", tmp_path / "preds.tsv"
    for out in (pq_out, tsv_out):
        proc = predict(trained / "hf_model", labelled["csv"], out, cache, "--id_field", "id")
        assert proc.returncode == 0, proc.stderr[-3000:]
    columns = ["id", "label", *(f"p_{lab}" for lab in LABELS)]
    table = pq.read_table(str(pq_out))
    assert table.column_names == columns
    assert str(table.schema.field("id").type) == "string" and str(table.schema.field("p_food").type) == "float"
    got = table.to_pylist()
    with open(tsv_out, newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        assert reader.fieldnames == columns
        tsv = list(reader)
    for rows_out in (got, tsv):
        assert [r["id"] for r in rows_out] == [p["id"] for p in reference]
        assert [r["label"] for r in rows_out] == [p["label"] for p in reference]
        for r, p in zip(rows_out, reference):
            assert [float(r[f"p_{lab}"]) for lab in LABELS] == pytest.approx(
                [p["probabilities"][lab] for lab in LABELS], abs=1e-5)
    assert json.loads(Path(f"{pq_out}.metrics.json").read_text())["accuracy"] == pytest.approx(
        json.loads(Path(f"{predicted}.metrics.json").read_text())["accuracy"])


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "in.jsonl"
    lines = [b'{"id": "a", "text": "ball goal team"}', b'{"id": "b", "text": "soup',
             '{"id": "c", "text": "caf\xe9 bread"}'.encode("latin-1"), b'{"id": "d", "text": "  "}',
             b'{"id": "e", "text": "server code chip"}', b"", b'{"id": "g", "text": "cheese dinner"}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_predict_marks_or_skips_bad_rows(trained, cache, bad_input, tmp_path):
    out = tmp_path / "marked.jsonl"
    proc = predict(trained / "hf_model", bad_input, out, cache, "--id_field", "id")
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = read_jsonl(out)
    # one row per input row (the blank line is none); a row that is no JSON has no columns to pass, a JSON row
    # with a stray non-UTF-8 byte keeps them
    assert [p["id"] for p in preds] == ["a", None, "c", "d", "e", "g"]
    errors = [p["error"] for p in preds]
    assert errors[0] is None and errors[4] is None and errors[5] is None
    assert "invalid JSON" in errors[1] and "UTF-8" in errors[2] and "empty text" in errors[3]
    bad = read_jsonl(Path(f"{out}.bad_rows.jsonl"))
    assert [b["row"] for b in bad] == [2, 3, 4]
    empty = [preds[i]["probabilities"] for i in (1, 2, 3)]  # predicted as the empty text: all alike
    assert empty[0] == empty[1] == empty[2]
    assert not Path(f"{out}.metrics.json").exists()  # no labels in the input

    skipped = tmp_path / "skipped.jsonl"
    proc = predict(trained / "hf_model", bad_input, skipped, cache, "--id_field", "id", "--skip_bad_rows")
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = read_jsonl(skipped)
    assert [p["id"] for p in kept] == ["a", "e", "g"]
    assert all("error" not in p for p in kept)
    assert [p["probabilities"] for p in kept] == [preds[i]["probabilities"] for i in (0, 4, 5)]
    assert [b["row"] for b in read_jsonl(Path(f"{skipped}.bad_rows.jsonl"))] == [2, 3, 4]


def test_predict_on_two_processes_matches_one(predicted, trained, labelled, tmp_path):
    """A fresh cache: rank 0 prepares the input while the other rank waits, then both map it."""
    out, fresh = tmp_path / "preds2.jsonl", tmp_path / "cache"
    proc = predict(trained / "hf_model", labelled["jsonl"], out, fresh, "--id_field", "id", "--keep", "n", "source",
                   processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = read_jsonl(predicted), read_jsonl(out)
    assert [p["id"] for p in two] == [p["id"] for p in one]
    assert [p["label"] for p in two] == [p["label"] for p in one]
    assert [p["n"] for p in two] == [p["n"] for p in one]
    for a, b in zip(one, two):
        assert [b["probabilities"][lab] for lab in LABELS] == pytest.approx(
            [a["probabilities"][lab] for lab in LABELS], abs=1e-5)
    assert len(entries(fresh)) == 1 and leftovers(fresh) == []
    m1 = json.loads(Path(f"{predicted}.metrics.json").read_text())
    m2 = json.loads(Path(f"{out}.metrics.json").read_text())
    assert m2["accuracy"] == m1["accuracy"] and m2["confusion_matrix"] == m1["confusion_matrix"]


def test_predict_refuses_existing_output_and_unknown_format(predicted, trained, cache, labelled, tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text("the user's earlier predictions\n")
    proc = predict(trained / "hf_model", labelled["jsonl"], out, cache)
    errors = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(errors) == 1 and "--overwrite" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert out.read_text() == "the user's earlier predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]

    odd = tmp_path / "p.xlsx"
    proc = predict(trained / "hf_model", labelled["jsonl"], odd, cache)
    errors = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(errors) == 1 and "p.xlsx" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not odd.exists()


def test_predict_overwrite_leaves_no_stale_side_files(trained, cache, bad_input, labelled, tmp_path):
    """A second prediction into the same output (--overwrite) must not leave the first one's bad-row list
    or metrics beside it: they would describe an input that is no longer the output's."""
    out = tmp_path / "p.jsonl"
    proc = predict(trained / "hf_model", labelled["jsonl"], out, cache)
    assert proc.returncode == 0 and Path(f"{out}.metrics.json").exists(), proc.stderr[-3000:]
    proc = predict(trained / "hf_model", bad_input, out, cache, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(f"{out}.bad_rows.jsonl").exists()
    stale = ["metrics.json"] if Path(f"{out}.metrics.json").exists() else []  # that input has no labels
    clean = write_jsonl(tmp_path / "clean.jsonl", [{"text": "ball goal"}, {"text": "soup"}])
    proc = predict(trained / "hf_model", clean, out, cache, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stale += ["bad_rows.jsonl"] if Path(f"{out}.bad_rows.jsonl").exists() else []  # that input has no bad rows
    assert stale == [], f"left from the earlier predictions into {out.name}: {stale}"


# ============================================================================= 6. --eval-only
def test_eval_only_of_the_exported_classifier_reproduces_the_run(trained, cache, data, tmp_path):
    out = tmp_path / "eval"
    proc = run(None, out, *data_overrides(data), f"model.name_or_path={trained / 'hf_model'}", "model.config=null",
               cache=cache, flags=["--eval-only"], timeout=300, **FT)
    assert prepared_lines(proc.stdout) == []  # the training run's entries
    got = json.loads((out / "eval_results.json").read_text())
    want = json.loads((trained / "eval_results.json").read_text())
    assert set(got) == {"dev", "test"}
    for split in ("dev", "test"):
        assert got[split]["accuracy"] == pytest.approx(want[split]["accuracy"])
        assert got[split]["confusion_matrix"] == want[split]["confusion_matrix"]
    assert not (out / "checkpoints").exists() and not (out / "hf_model").exists()


def test_eval_only_of_a_checkpoint_leaves_the_run_alone(cache, data, tmp_path):
    out = tmp_path / "run"
    args = (*data_overrides(data), "train.max_steps=6", "train.eval_every=3", "train.save_every=3")
    run(None, out, *args, "train.stop_at_step=3", cache=cache, timeout=300, **FT)
    assert not (out / "eval_results.json").exists() and (out / "checkpoints" / "step_00000003").is_dir()
    dev_at_3 = [m for m in metrics(out) if m.get("split") == "dev" and m["step"] == 3]
    assert len(dev_at_3) == 1
    before = snapshot(out)
    proc = run(None, out, *args, cache=cache, flags=["--eval-only"], timeout=300, **FT)
    assert "step 3" in proc.stdout
    results = json.loads((out / "eval_results.json").read_text())
    assert results["dev"]["accuracy"] == pytest.approx(dev_at_3[0]["accuracy"])
    assert results["test"]["n"] == 9
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k != "eval_results.json"} == before, "the run's files changed"

    written = (out / "eval_results.json").read_bytes()
    proc = run(None, out, *args, cache=cache, flags=["--eval-only"], check=False, timeout=300, **FT)
    errors = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(errors) == 1 and "--overwrite" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert (out / "eval_results.json").read_bytes() == written

    run(None, out, *args, cache=cache, flags=["--eval-only", "--overwrite"], timeout=300, **FT)
    assert {k: v for k, v in snapshot(out).items() if k != "eval_results.json"} == before, \
        "--eval-only --overwrite replaced the run"
    assert json.loads((out / "eval_results.json").read_text())["dev"] == results["dev"]


@pytest.mark.parametrize("strategy", ["head", "tail"])
def test_exported_tokenizer_truncates_like_training_in_hf_pipelines(tmp_path, data, strategy):
    """A standard-head export's tokenizer (max_len, truncation side) cuts a long text to the very input the
    trainer built for it, so HF's pipeline(..., truncation=True) sees what training saw."""
    from transformers import AutoTokenizer
    out = tmp_path / "run"
    run(None, out, *data_overrides(data), *TINY, f"text.strategy={strategy}", "text.max_len=24",
        cache=tmp_path / "cache", **FT)
    tok = AutoTokenizer.from_pretrained(str(out / "hf_model"))
    text = long_text(80)
    pieces = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert len(pieces) > 24
    [(expected, _)] = Encoder(tok, TextConfig(strategy=strategy, max_len=24)).encode_pieces((pieces,))
    assert tok(text, truncation=True)["input_ids"] == expected


def test_the_cache_key_ignores_call_time_truncation_and_padding(tiny_tokenizer, tmp_path):
    """A model's exported tokenizer (no padding/truncation settings) and the checkpoint's own (all-MiniLM-L6-v2's
    pads to 128) make the same pieces: the stages of a recipe must share one entry, not re-prepare."""
    import copy
    from trainer.data.cache import tokenizer_digest
    other = copy.deepcopy(tiny_tokenizer)
    other.backend_tokenizer.enable_truncation(max_length=128)
    other.backend_tokenizer.enable_padding(length=128)
    assert tokenizer_digest(other) == tokenizer_digest(tiny_tokenizer)
    path = write_jsonl(tmp_path / "t.jsonl", rows(10, 3))
    first, second = Log(), Log()
    prepare(path, tiny_tokenizer, tmp_path / "cache", log=first)
    prepare(path, other, tmp_path / "cache", log=second)
    assert first.prepared() and not second.prepared()
    other.add_tokens(["zzzunseen"])  # a different vocabulary is a different key
    assert tokenizer_digest(other) != tokenizer_digest(tiny_tokenizer)
