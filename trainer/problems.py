"""What a task predicts — one class per text (`single_label`), a set of labels (`multi_label`) or a number
(`regression`) — and everything that follows from it, in one place: the targets read from a prepared split, the
head's width and loss, predictions, metrics, the metric that selects the best checkpoint, and how the dev carve
and few-shot subsets are stratified.

Targets (numpy, one row per example): single_label int32 class ids; multi_label float32 multi-hot [n, labels];
regression float32 values in the data's own scale (the head standardizes them, `classifier.TaskHead`).

Selecting a checkpoint across tasks of different kinds (multi-task runs): each task's selection metric becomes a
*shortfall from perfect* — the metric itself where lower is better (error_rate, mse, mae), 1 − metric where higher
is better (accuracy, F1s, exact_match, pearson, spearman) — and the run keeps the checkpoint with the lowest mean
shortfall. With the defaults (error rate · 1 − micro-F1 · 1 − Pearson) every term is 0 for a perfect model and
about 1 for a useless one, so no task type outweighs another by its units; mse and mae have units, so they can
select only runs whose tasks are all regression."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .errors import UserError

SINGLE, MULTI, REGRESSION = "single_label", "multi_label", "regression"
PROBLEM_TYPES = (SINGLE, MULTI, REGRESSION)
HF_PROBLEM_TYPE = {SINGLE: "single_label_classification", MULTI: "multi_label_classification",
                   REGRESSION: "regression"}

HIGHER_IS_BETTER = {"error_rate": False, "accuracy": True, "macro_f1": True, "micro_f1": True, "exact_match": True,
                    "mse": False, "mae": False, "pearson": True, "spearman": True}
METRICS_OF = {SINGLE: ("error_rate", "accuracy", "macro_f1"), MULTI: ("micro_f1", "macro_f1", "exact_match"),
              REGRESSION: ("pearson", "spearman", "mse", "mae")}
DEFAULT_METRIC = {t: m[0] for t, m in METRICS_OF.items()}
REGRESSION_BINS = 10  # quantile bins that stratify a numeric target (dev carve, few-shot fraction)


# ----------------------------------------------------------------------------- targets from prepared data
def _first_row(store, value_index: int) -> int:
    return int(store.row[int(np.flatnonzero(np.asarray(store.label) == value_index)[0])])


def _where(store, value_index: int) -> str:
    return f"{store.meta['source']} row {_first_row(store, value_index)}"


def label_set(store, value_index: int, value, separator: str, names: Optional[list]) -> tuple:
    """One stored multi-label value as a tuple of label names: a list (jsonl / parquet / hub `Sequence`), or a
    string split on `separator` (csv / tsv); a ClassLabel id becomes its name."""
    if isinstance(value, list):
        items = value
    elif isinstance(value, str):
        items = [p.strip() for p in value.split(separator)] if separator else [value]
    else:
        items = [value]
    out = []
    for item in items:
        if isinstance(item, (list, dict)) or item is None:
            raise UserError(f"{_where(store, value_index)}: label {value!r} must be a list of label names")
        if isinstance(item, float) and item.is_integer():
            item = int(item)
        if names and isinstance(item, int) and 0 <= item < len(names):
            item = names[item]
        if isinstance(item, str) and not item:
            continue
        out.append(str(item) if not isinstance(item, int) or names else item)
    return tuple(out)


def sort_labels(labels) -> list:
    """Sorted distinct labels (numbers numerically, anything else as text); index = class id."""
    distinct = {x.item() if isinstance(x, np.generic) else x for x in labels}
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in distinct):
        return sorted(distinct)
    return sorted(str(x) for x in distinct)


def vocabulary(problem: str, store, label_field: str, separator: str) -> list:
    """The label names of a task from its training split: the classes (single_label), every label that occurs
    (multi_label; a hub `Sequence(ClassLabel)` keeps its names and order), or the one output (regression:
    named after the label field)."""
    if problem == REGRESSION:
        return [label_field]
    if problem == MULTI:
        if store.label_names:
            return list(store.label_names)
        sets = [label_set(store, v, value, separator, None) for v, value in enumerate(store.label_values)]
        if store.label_values and all(isinstance(v, str) for v in store.label_values) and separator and not any(
                separator in v for v in store.label_values):
            raise UserError(f"{store.meta['source']}: data.label_separator {separator!r} splits no label (every row "
                            f"has one label); name the separator the file uses, or set data.problem_type=single_label")
        return sort_labels(label for s in sets for label in s)
    _refuse_lists(store)
    if store.label_names:
        return list(store.label_names)
    return sort_labels(store.label_values)


def targets(problem: str, store, vocab: list, separator: str, from_names: bool) -> np.ndarray:
    """The targets of every example of a prepared split (layout in the module docstring). A label the training
    split does not have, a list in a single-label task, or a target that is not a finite number is an error
    naming the file and row."""
    ids = np.asarray(store.label)
    if problem == SINGLE:
        return _class_ids(store, vocab, from_names)[ids]
    if problem == MULTI:
        index = {str(label): i for i, label in enumerate(vocab)}
        table = np.zeros((len(store.label_values), len(vocab)), dtype=np.float32)
        for v, value in enumerate(store.label_values):
            for label in label_set(store, v, value, _separator_of(separator, value), store.label_names):
                if str(label) not in index:
                    raise UserError(f"{_where(store, v)}: label {label!r} is not among the training labels "
                                    f"({', '.join(map(str, vocab))})")
                table[v, index[str(label)]] = 1.0
        return table[ids]
    values = np.empty(len(store.label_values), dtype=np.float64)
    for v, value in enumerate(store.label_values):
        try:
            number = float(value) if not isinstance(value, (list, bool)) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise UserError(f"{_where(store, v)}: regression target {value!r} is not a finite number")
        values[v] = number
    return values[ids].astype(np.float32)


def _separator_of(separator: str, value) -> str:
    return separator if isinstance(value, str) else ""


def _refuse_lists(store) -> None:
    """A single-label split whose label is a list: the task is multi-label (named in one line with the row)."""
    for v, value in enumerate(store.label_values):
        if isinstance(value, list):
            raise UserError(f"{_where(store, v)}: label {value!r} is a list — texts with several labels are "
                            f"data.problem_type=multi_label")


def _class_ids(store, vocab: list, names: bool) -> np.ndarray:
    """Class id of each distinct stored label value; a label not in `vocab` is an error naming its row."""
    index = {label: i for i, label in enumerate(vocab)}
    numeric = all(isinstance(x, (int, float)) for x in vocab)
    ids = np.empty(len(store.label_values), dtype=np.int32)
    _refuse_lists(store)
    for v, label in enumerate(store.label_values):
        if names and isinstance(label, int) and store.label_names in (None, vocab):
            key = vocab[label] if 0 <= label < len(vocab) else None  # a ClassLabel id
        elif names and isinstance(label, str) and label not in index and label.isdigit():
            key = vocab[int(label)] if int(label) < len(vocab) else None  # a ClassLabel id read from csv
        elif numeric:  # 1 from jsonl / parquet, 1.0 and "1" from csv name the same class (1 == 1.0 as a key)
            try:
                key = float(label)
            except (TypeError, ValueError):
                key = label
        else:
            key = str(label)
        if key not in index:
            raise UserError(f"{_where(store, v)}: label {label!r} is not among the training labels "
                            f"({', '.join(map(str, vocab))})")
        ids[v] = index[key]
    if store.label_names and names and store.label_names != vocab:
        raise UserError(f"{store.meta['source']}: its label names {store.label_names} differ from the training "
                        f"data's {vocab}")
    return ids


def num_outputs(problem: str, vocab: list) -> int:
    return 1 if problem == REGRESSION else len(vocab)


# ----------------------------------------------------------------------------- stratification
def strata(problem: str, y: np.ndarray) -> np.ndarray:
    """A group id per example to stratify subsets by: the class (single_label); the rarest label an example
    carries, by its training frequency, with label-less examples a group of their own (multi_label — rare labels
    keep their share, the simple stand-in for iterative stratification); the target's quantile bin (regression,
    up to REGRESSION_BINS equally filled bins, so the subset spans the target's range)."""
    if problem == SINGLE:
        return np.asarray(y)
    if problem == MULTI:
        freq = y.sum(0)
        rank = np.where(y > 0, freq[None, :], np.inf)
        return np.where(y.sum(1) > 0, rank.argmin(1), y.shape[1])
    bins = max(1, min(REGRESSION_BINS, len(y) // 2))
    edges = np.quantile(y, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, y, side="right")


# ----------------------------------------------------------------------------- loss weights
def loss_weights(problem: str, setting, y: np.ndarray, vocab: list, key: str) -> Optional[np.ndarray]:
    """Per-class weights for cross-entropy (single_label, `data.class_weights`) or per-label positive weights for
    BCE (multi_label, `data.pos_weight`): `balanced` (n / (classes · count) — scikit-learn's; negatives / positives
    per label — BCE's own convention), or a list with one positive number per label."""
    if setting is None:
        return None
    if setting == "balanced":
        if problem == SINGLE:
            counts = np.bincount(y, minlength=len(vocab)).astype(np.float64)
            w = np.divide(len(y), len(vocab) * counts, out=np.ones_like(counts), where=counts > 0)
        else:
            pos = y.sum(0).astype(np.float64)
            w = np.divide(len(y) - pos, pos, out=np.ones_like(pos), where=pos > 0)
        return w.astype(np.float32)
    if not isinstance(setting, list) or len(setting) != len(vocab) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in setting):
        raise UserError(f"{key} must be 'balanced' or a list of {len(vocab)} positive numbers (one per label, in "
                        f"the order {', '.join(map(str, vocab))}); got {setting!r}")
    return np.asarray(setting, dtype=np.float32)


# ----------------------------------------------------------------------------- predictions and metrics
def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _prf(tp, fp, fn):
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp, dtype=float), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.zeros_like(tp, dtype=float), where=(tp + fn) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                   where=(precision + recall) > 0)
    return precision, recall, f1


def _report(names, precision, recall, f1, support) -> dict:
    return {str(n): {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for n, p, r, f, s in zip(names, precision, recall, f1, support)}


def single_label_metrics(pred: np.ndarray, gold: np.ndarray, vocab: list) -> dict:
    """accuracy, error rate, macro-F1 (over classes present in gold or predictions), the confusion matrix (rows:
    gold, columns: predicted) and a per-class precision / recall / F1 / support report."""
    n = len(vocab)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (gold, pred), 1)
    tp = np.diag(confusion).astype(float)
    precision, recall, f1 = _prf(tp, confusion.sum(0) - tp, confusion.sum(1) - tp)
    present = confusion.sum(1) + confusion.sum(0) > 0
    accuracy = float(tp.sum() / max(1, len(gold)))
    return {"accuracy": accuracy, "error_rate": 1.0 - accuracy,
            "macro_f1": float(f1[present].mean()) if present.any() else 0.0, "n": int(len(gold)),
            "confusion_matrix": confusion.tolist(), "per_class": _report(vocab, precision, recall, f1,
                                                                         confusion.sum(1))}


def multi_label_metrics(pred: np.ndarray, gold: np.ndarray, vocab: list) -> dict:
    """micro-F1 (every label decision pooled), macro-F1 (mean over labels present in gold or predictions),
    exact match (the whole label set right; two empty sets match) and a per-label report."""
    pred, gold = pred.astype(bool), gold.astype(bool)
    tp = (pred & gold).sum(0).astype(float)
    fp = (pred & ~gold).sum(0).astype(float)
    fn = (~pred & gold).sum(0).astype(float)
    precision, recall, f1 = _prf(tp, fp, fn)
    _, _, micro = _prf(np.array([tp.sum()]), np.array([fp.sum()]), np.array([fn.sum()]))
    present = (tp + fp + fn) > 0
    return {"micro_f1": float(micro[0]), "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
            "exact_match": float((pred == gold).all(1).mean()) if len(gold) else 0.0, "n": int(len(gold)),
            "per_label": _report(vocab, precision, recall, f1, gold.sum(0))}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), as Spearman's coefficient needs."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.arange(len(x), dtype=float)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's r; 0.0 where it is undefined (a constant side carries no information about the other)."""
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def regression_metrics(pred: np.ndarray, gold: np.ndarray) -> dict:
    pred, gold = pred.astype(np.float64), gold.astype(np.float64)
    err = pred - gold
    return {"pearson": _correlation(pred, gold), "spearman": _correlation(_ranks(pred), _ranks(gold)),
            "mse": float((err ** 2).mean()) if len(gold) else 0.0, "mae": float(np.abs(err).mean()) if len(gold)
            else 0.0, "n": int(len(gold))}


def predictions(problem: str, logits: np.ndarray, thresholds: Optional[np.ndarray] = None) -> np.ndarray:
    """Class ids (single_label), 0/1 per label (multi_label: probability ≥ the label's threshold), values."""
    if problem == SINGLE:
        return logits.argmax(-1)
    if problem == MULTI:
        return (sigmoid(logits) >= (0.5 if thresholds is None else thresholds)).astype(np.int8)
    return logits[:, 0]


def metrics(problem: str, logits: np.ndarray, gold: np.ndarray, vocab: list,
            thresholds: Optional[np.ndarray] = None) -> dict:
    pred = predictions(problem, logits, thresholds)
    if problem == SINGLE:
        return single_label_metrics(pred, gold, vocab)
    if problem == MULTI:
        return multi_label_metrics(pred, gold, vocab)
    return regression_metrics(pred, gold)


def tune_thresholds(logits: np.ndarray, gold: np.ndarray, default: float) -> np.ndarray:
    """Per label, the probability threshold (0.05 … 0.95 in steps of 0.05) with the best F1 on these examples;
    ties keep the one nearest `default`, and a label that never occurs keeps `default`."""
    probs = sigmoid(logits)
    grid = np.round(np.arange(0.05, 0.951, 0.05), 2)
    out = np.full(gold.shape[1], default, dtype=np.float32)
    for j in range(gold.shape[1]):
        y = gold[:, j] > 0
        if not y.any():
            continue
        best = (-1.0, 0.0)
        for t in grid:
            p = probs[:, j] >= t
            tp, fp, fn = float((p & y).sum()), float((p & ~y).sum()), float((~p & y).sum())
            f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
            key = (round(f1, 12), -abs(t - default))
            if key > best:
                best, out[j] = key, t
    return out


def headline(problem: str, result: dict) -> tuple[str, float]:
    """The metric a results table shows for a task: error rate (the paper's), micro-F1, Pearson."""
    name = DEFAULT_METRIC[problem]
    return name, result[name]


def summary_line(problem: str, r: dict) -> str:
    if problem == SINGLE:
        return f"accuracy {r['accuracy']:.4f} · error {r['error_rate']:.4f} · macro-F1 {r['macro_f1']:.4f}"
    if problem == MULTI:
        return f"micro-F1 {r['micro_f1']:.4f} · macro-F1 {r['macro_f1']:.4f} · exact match {r['exact_match']:.4f}"
    return f"Pearson {r['pearson']:.4f} · Spearman {r['spearman']:.4f} · MSE {r['mse']:.4g} · MAE {r['mae']:.4g}"


# ----------------------------------------------------------------------------- checkpoint selection
def selection_metrics(problems: list[str], setting: str) -> list[str]:
    """The metric each task is selected on: `auto` — its kind's default (error_rate · micro_f1 · pearson) —
    or the one named, which every task of the run must have."""
    if setting == "auto":
        return [DEFAULT_METRIC[p] for p in problems]
    if setting not in HIGHER_IS_BETTER:
        raise UserError(f"eval.select_metric must be auto or one of {', '.join(HIGHER_IS_BETTER)}; got {setting!r}")
    lacking = sorted({p for p in problems if setting not in METRICS_OF[p]})
    if lacking:
        raise UserError(f"eval.select_metric={setting} is not a metric of {' / '.join(lacking)} tasks (theirs: "
                        f"{'; '.join(', '.join(METRICS_OF[p]) for p in lacking)}); use auto or one every task has")
    return [setting] * len(problems)


def shortfall(name: str, value: float) -> float:
    """Lower is better: the metric itself, or 1 − metric where higher is better (see the module docstring)."""
    return 1.0 - value if HIGHER_IS_BETTER[name] else value
