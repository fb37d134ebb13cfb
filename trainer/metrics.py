"""Classification metrics: accuracy, error rate, macro-F1 and the confusion matrix."""
from __future__ import annotations

import numpy as np


def classification_metrics(pred: np.ndarray, gold: np.ndarray, num_labels: int) -> dict:
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)  # rows: gold, columns: predicted
    np.add.at(confusion, (gold, pred), 1)
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros_like(tp), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros_like(tp), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=precision + recall > 0)
    present = confusion.sum(1) + confusion.sum(0) > 0  # classes absent from both gold and predictions don't count
    accuracy = float(tp.sum() / max(1, len(gold)))
    return {"accuracy": accuracy, "error_rate": 1.0 - accuracy, "macro_f1": float(f1[present].mean()),
            "n": int(len(gold)), "confusion_matrix": confusion.tolist()}
