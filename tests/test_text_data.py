"""Classification data: split files, label vocabulary, row-numbered errors, dev carving, few-shot, metrics."""
from __future__ import annotations

import csv
import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from trainer.config import ClassificationDataConfig
from trainer.errors import UserError
from trainer.problems import single_label_metrics, sort_labels
from trainer.text.tasks import load_task as _load_task
from trainer.text.tasks import read_split as _read_split

ROWS = [{"text": "a fine film", "label": "pos"}, {"text": "dull and long", "label": "neg"},
        {"text": "it was fine I guess", "label": "neu"}, {"text": "superb acting", "label": "pos"}]


def write_jsonl(path: Path, rows, gz: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def write_delimited(path: Path, rows, delimiter: str, gz: bool = False) -> Path:
    opener = (lambda: gzip.open(path, "wt", encoding="utf-8", newline="")) if gz else \
        (lambda: open(path, "w", encoding="utf-8", newline=""))
    with opener() as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        w.writeheader()
        w.writerows(rows)
    return path


def write_parquet(path: Path, rows) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


def cfg(**kw) -> ClassificationDataConfig:
    return ClassificationDataConfig(**kw)


@pytest.fixture(autouse=True)
def _tok(tiny_tokenizer, tmp_path):
    global TOK, CACHE
    TOK, CACHE = tiny_tokenizer, tmp_path / "cache"


def read_split(spec, c, split):
    return _read_split(spec, c, split, TOK, CACHE)


def load_task(c, seed):
    """(splits, class ids per split, vocabulary) — the split's examples are rows of the prepared store."""
    splits, vocab = _load_task(c, seed, TOK, CACHE)
    return splits, {k: v.labels for k, v in splits.items()}, vocab


def pieces(text: str) -> list:
    return TOK(text, add_special_tokens=False)["input_ids"]


def rows_of(examples) -> list:
    """Source rows (1-based) of a split's examples."""
    return np.asarray(examples.store.row)[examples.idx].tolist()


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.csv", "d.csv.gz", "d.tsv", "d.tsv.gz", "d.parquet"])
def test_read_formats(tmp_path, name):
    path = tmp_path / name
    gz = name.endswith(".gz")
    if ".jsonl" in name:
        write_jsonl(path, ROWS, gz)
    elif ".csv" in name:
        write_delimited(path, ROWS, ",", gz)
    elif ".tsv" in name:
        write_delimited(path, ROWS, "\t", gz)
    else:
        write_parquet(path, ROWS)
    store = read_split(str(path), cfg(), "train")
    assert [store.pieces(i) for i in range(store.n)] == [(pieces(r["text"]),) for r in ROWS]
    assert [store.label_values[y] for y in store.label] == [r["label"] for r in ROWS]
    assert store.meta["source"] == str(path) and store.row.tolist() == [1, 2, 3, 4]


def test_custom_fields_and_pairs(tmp_path):
    rows = [{"q": "is it good", "a": "yes very", "y": 1}, {"q": "is it bad", "a": "no", "y": 0}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    store = read_split(str(path), cfg(text_fields=["q", "a"], label_field="y"), "train")
    assert [store.pieces(i) for i in range(2)] == [(pieces("is it good"), pieces("yes very")),
                                                     (pieces("is it bad"), pieces("no"))]
    assert [store.label_values[y] for y in store.label] == [1, 0]


def test_sort_labels():
    assert sort_labels(["pos", "neg", "neu", "pos"]) == ["neg", "neu", "pos"]
    assert sort_labels([10, 2, 1, 2]) == [1, 2, 10]  # numbers numerically
    assert sort_labels([np.int64(3), 1]) == [1, 3]


def test_string_and_int_labels_load(tmp_path):
    for labels, vocab in ((["b", "a", "c", "a", "b", "c"], ["a", "b", "c"]), ([5, 1, 3, 1, 5, 3], [1, 3, 5])):
        rows = [{"text": f"text number {i}", "label": y} for i, y in enumerate(labels)]
        train = write_jsonl(tmp_path / "train.jsonl", rows)
        test = write_jsonl(tmp_path / "test.jsonl", rows[::-1])
        splits, ids, got = load_task(cfg(train=str(train), dev=str(train), test=str(test)), 0)
        assert got == vocab
        assert [vocab[i] for i in ids["train"]] == labels
        assert [vocab[i] for i in ids["test"]] == labels[::-1]
        assert set(splits) == {"train", "dev", "test"}


def test_int_labels_match_across_formats(tmp_path):
    rows = [{"text": f"text number {i}", "label": i % 2} for i in range(6)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_delimited(tmp_path / "test.csv", rows, ",")
    _, ids, vocab = load_task(cfg(train=str(train), dev=str(train), test=str(test)), 0)
    assert vocab == [0, 1] and ids["test"].tolist() == [0, 1, 0, 1, 0, 1]


# ----------------------------------------------------------------------------- errors naming file and row
def test_unknown_test_label_names_file_and_row(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", ROWS[:2] + [{"text": "meh", "label": "mixed"}])
    with pytest.raises(UserError) as exc:
        load_task(cfg(train=str(train), dev=str(train), test=str(test)), 0)
    msg = str(exc.value)
    assert str(test) in msg and "row 3" in msg and "'mixed'" in msg


def test_unknown_label_row_counts_blank_lines(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n" +
                    json.dumps({"text": "meh", "label": "mixed"}) + "\n")
    with pytest.raises(UserError, match=r"row 4: label 'mixed'"):
        load_task(cfg(train=str(train), dev=str(train), test=str(test)), 0)


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_missing_label_names_row(tmp_path, ext):
    rows = [dict(r) for r in ROWS]
    rows[2]["label"] = None if ext == "jsonl" else ""
    if ext == "jsonl":
        del rows[2]["label"]
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    else:
        path = write_delimited(tmp_path / "d.csv", rows, ",")
    with pytest.raises(UserError, match=rf"{path} row 3: no label field 'label'"):
        read_split(str(path), cfg(), "train")


def test_missing_label_column_in_csv(tmp_path):
    path = write_delimited(tmp_path / "d.csv", [{"text": r["text"]} for r in ROWS], ",")
    with pytest.raises(UserError, match="no column 'label'"):
        read_split(str(path), cfg(), "train")


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_text_names_row(tmp_path, empty):
    rows = [dict(r) for r in ROWS]
    rows[1]["text"] = empty
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(UserError, match=rf"{path} row 2: empty text"):
        read_split(str(path), cfg(), "train")


@pytest.mark.parametrize("name", ["d.jsonl", "d.csv", "d.jsonl.gz"])
def test_non_utf8_is_an_error(tmp_path, name):
    path = tmp_path / name
    data = ('{"text": "caf\xe9", "label": "a"}\n' if "jsonl" in name else "text,label\ncaf\xe9,a\n").encode("latin-1")
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(UserError, match="not valid UTF-8"):
        read_split(str(path), cfg(), "train")


def test_missing_file_and_single_class(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        read_split(str(tmp_path / "nope.jsonl"), cfg(), "train")
    one = write_jsonl(tmp_path / "one.jsonl", [{"text": "x y", "label": "a"}] * 5)
    with pytest.raises(UserError, match="single class"):
        load_task(cfg(train=str(one)), 0)


# ----------------------------------------------------------------------------- dev carving and few-shot
def _imbalanced(tmp_path: Path) -> tuple[Path, Counter]:
    counts = {"a": 50, "b": 23, "c": 7, "d": 120}
    rows = [{"text": f"doc {lab} {i}", "label": lab} for lab, n in counts.items() for i in range(n)]
    rng = np.random.default_rng(0)
    rows = [rows[i] for i in rng.permutation(len(rows))]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    ROWS_OF[path] = rows
    return path, Counter(counts)


ROWS_OF: dict = {}


def test_dev_carved_from_train_is_stratified_seeded_disjoint(tmp_path):
    path, counts = _imbalanced(tmp_path)
    total = sum(counts.values())

    def carve(seed, ratio=0.1):
        splits, ids, vocab = load_task(cfg(train=str(path), dev_ratio=ratio), seed)
        return splits, ids, vocab

    splits, ids, vocab = carve(1)
    dev_texts = [ROWS_OF[path][r - 1]["text"] for r in rows_of(splits["dev"])]
    train_texts = [ROWS_OF[path][r - 1]["text"] for r in rows_of(splits["train"])]
    assert not set(dev_texts) & set(train_texts)  # disjoint
    assert len(dev_texts) + len(train_texts) == total  # together: all of train
    dev_counts = Counter(vocab[i] for i in ids["dev"])
    for lab, n in counts.items():
        assert abs(dev_counts[lab] - 0.1 * n) <= 1, (lab, dev_counts[lab], n)
        assert dev_counts[lab] >= 1
    # label ids match the texts (each text names its label)
    assert all(t.split()[1] == vocab[i] for t, i in zip(dev_texts, ids["dev"]))
    assert all(t.split()[1] == vocab[i] for t, i in zip(train_texts, ids["train"]))
    same, _, _ = carve(1)
    assert rows_of(same["dev"]) == rows_of(splits["dev"])
    other, _, _ = carve(2)
    assert rows_of(other["dev"]) != rows_of(splits["dev"])
    big, big_ids, _ = carve(1, ratio=0.3)
    big_counts = Counter(vocab[i] for i in big_ids["dev"])
    assert all(abs(big_counts[lab] - 0.3 * n) <= 1 for lab, n in counts.items())


@pytest.mark.parametrize("kind", ["fraction", "per_class"])
def test_few_shot_is_stratified_seeded_subset(tmp_path, kind):
    path, counts = _imbalanced(tmp_path)
    base_cfg = dict(train=str(path), dev=str(path))  # a given dev split: few-shot applies to train only
    full, full_ids, vocab = load_task(cfg(**base_cfg), 0)
    option = {"few_shot_fraction": 0.2} if kind == "fraction" else {"few_shot_per_class": 5}

    def take(seed):
        return load_task(cfg(**base_cfg, **option), seed)

    splits, ids, _ = take(3)
    texts = [ROWS_OF[path][r - 1]["text"] for r in rows_of(splits["train"])]
    assert set(rows_of(splits["train"])) <= set(rows_of(full["train"]))
    assert len(set(texts)) == len(texts)
    got = Counter(vocab[i] for i in ids["train"])
    for lab, n in counts.items():
        want = 0.2 * n if kind == "fraction" else min(5, n)
        assert abs(got[lab] - want) <= 1 and got[lab] >= 1, (lab, got[lab])
    assert all(t.split()[1] == vocab[i] for t, i in zip(texts, ids["train"]))
    assert rows_of(take(3)[0]["train"]) == rows_of(splits["train"])
    assert rows_of(take(4)[0]["train"]) != rows_of(splits["train"])
    assert rows_of(splits["dev"]) == rows_of(full["dev"])  # dev untouched


def test_few_shot_out_of_range(tmp_path):
    path, _ = _imbalanced(tmp_path)
    for opt, match in (({"few_shot_fraction": 0.0}, "few_shot_fraction"),
                       ({"few_shot_fraction": 1.5}, "few_shot_fraction"),
                       ({"few_shot_per_class": 0}, "few_shot_per_class")):
        with pytest.raises(UserError, match=match):
            load_task(cfg(train=str(path), **opt), 0)


# ----------------------------------------------------------------------------- metrics
def test_classification_metrics_hand_computed():
    gold = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    m = single_label_metrics(pred, gold, [0, 1, 2])
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["error_rate"] == pytest.approx(2 / 6)
    # per class (P, R, F1): 0 → (1, 2/3, 0.8) · 1 → (1/2, 1/2, 1/2) · 2 → (1/2, 1, 2/3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert m["n"] == 6
    # rows are gold, columns predicted
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["per_class"]["0"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8),
                                   "support": 3}
    assert m["per_class"]["2"]["support"] == 1 and m["per_class"]["1"]["f1"] == pytest.approx(0.5)


def test_confusion_orientation_and_absent_classes():
    gold = np.array([2, 2, 2])
    pred = np.array([0, 0, 2])
    m = single_label_metrics(pred, gold, [0, 1, 2, 3])
    assert m["confusion_matrix"][2] == [2, 0, 1, 0]  # gold class 2's row
    assert [row[0] for row in m["confusion_matrix"]] == [0, 0, 2, 0]  # predicted-0 column
    # class 0 (predicted, never gold) has F1 0 and counts; classes 1 and 3 appear nowhere and don't count
    f1_2 = 2 * 1.0 * (1 / 3) / (1.0 + 1 / 3)
    assert m["macro_f1"] == pytest.approx((0.0 + f1_2) / 2)
    perfect = single_label_metrics(np.array([1, 0, 1]), np.array([1, 0, 1]), [0, 1])
    assert perfect["accuracy"] == 1.0 and perfect["macro_f1"] == 1.0 and perfect["error_rate"] == 0.0


def test_unknown_label_message_names_file_row_and_vocabulary(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "x", "label": "a"}, {"text": "y", "label": "b"}])
    test = write_delimited(tmp_path / "t.tsv", [{"text": "x", "label": "a"}, {"text": "y", "label": "z"}], "\t")
    with pytest.raises(UserError, match=rf"{test} row 2: label 'z' is not among the training labels \(a, b\)"):
        load_task(cfg(train=str(train), dev=str(train), test=str(test)), 0)
