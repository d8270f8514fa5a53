"""Task metrics from predictions and labels: accuracy, macro-F1, MCC, binary F1, Pearson and Spearman.

    classification_metrics([1, 0, 1], [1, 1, 1], num_labels=2)
    -> {"accuracy": 0.667, "macro_f1": 0.4, "mcc": 0.0, "f1": 0.8}
    regression_metrics([0.1, 0.5, 0.9], [0.0, 1.0, 2.0]) -> {"pearson": ..., "spearman": 1.0, "mse": ...}

Written with numpy (and scipy's rank function) so that the definitions are the textbook ones, in one place:
classification metrics come from the confusion matrix, the regression ones from the paired values. A metric
that is undefined on the data (MCC or a correlation with a constant side, F1 of a class that is neither
predicted nor present) is 0.0, the convention GLUE's scorers and scikit-learn use, so that a degenerate
model scores at the bottom rather than as NaN.
"""
from __future__ import annotations

import numpy as np

# Every metric memtune reports; larger is better for all but mse.
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "mcc", "f1")
REGRESSION_METRICS = ("pearson", "spearman", "mse")
NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "mcc": "MCC", "f1": "F1", "pearson": "Pearson",
         "spearman": "Spearman", "mse": "MSE", "perplexity": "perplexity"}


def confusion_matrix(predictions, labels, num_labels: int) -> np.ndarray:
    """C×C counts: row = true class, column = predicted class."""
    pred = np.asarray(predictions, dtype=np.int64).ravel()
    true = np.asarray(labels, dtype=np.int64).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"{pred.size} predictions for {true.size} labels")
    matrix = np.zeros((num_labels, num_labels), dtype=np.int64)
    np.add.at(matrix, (true, pred), 1)
    return matrix


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else 0.0


def per_class_f1(matrix: np.ndarray) -> np.ndarray:
    """F1 = 2·TP / (2·TP + FP + FN) per class (0 for a class neither present nor predicted)."""
    tp = np.diag(matrix).astype(np.float64)
    fp = matrix.sum(axis=0) - tp                 # predicted as the class, but another
    fn = matrix.sum(axis=1) - tp                 # of the class, predicted as another
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.zeros_like(tp), where=den > 0)


def matthews_corrcoef(matrix: np.ndarray) -> float:
    """Matthews correlation, the multi-class form (Gorodkin 2004), which for two classes is
    (TP·TN − FP·FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))."""
    m = matrix.astype(np.float64)
    n = m.sum()
    correct = np.trace(m)
    pred_per_class, true_per_class = m.sum(axis=0), m.sum(axis=1)
    cov_pt = correct * n - pred_per_class @ true_per_class
    cov_pp = n * n - pred_per_class @ pred_per_class
    cov_tt = n * n - true_per_class @ true_per_class
    return _ratio(cov_pt, np.sqrt(cov_pp * cov_tt))


def classification_metrics(predictions, labels, num_labels: int) -> dict[str, float]:
    """accuracy, macro_f1 (mean F1 over the classes), mcc, and for two classes f1 of class 1 (the positive one:
    "equivalent" in MRPC, "duplicate" in QQP).

    A prediction of -1 names no class (a generated text that is no label word): it is wrong, a false negative
    of its true class and a false positive of none (it gets a column of its own, which no true label has)."""
    pred = np.asarray(predictions, dtype=np.int64).ravel()
    matrix = confusion_matrix(np.where(pred < 0, num_labels, pred), labels, num_labels + 1)
    f1 = per_class_f1(matrix)[:num_labels]
    out = {"accuracy": _ratio(np.trace(matrix), matrix.sum()),
           "macro_f1": float(f1.mean()),
           "mcc": matthews_corrcoef(matrix)}
    if num_labels == 2:
        out["f1"] = float(f1[1])
    return out


def pearson(x, y) -> float:
    """Pearson correlation: covariance over the product of the standard deviations (0 for a constant side)."""
    x = np.asarray(x, dtype=np.float64).ravel() - np.mean(x)
    y = np.asarray(y, dtype=np.float64).ravel() - np.mean(y)
    return _ratio(float(x @ y), float(np.sqrt((x @ x) * (y @ y))))


def spearman(x, y) -> float:
    """Spearman correlation: Pearson's on the ranks, ties sharing their average rank."""
    from scipy.stats import rankdata

    return pearson(rankdata(np.asarray(x, dtype=np.float64).ravel()), rankdata(np.asarray(y, dtype=np.float64).ravel()))


def regression_metrics(predictions, labels) -> dict[str, float]:
    p = np.asarray(predictions, dtype=np.float64).ravel()
    t = np.asarray(labels, dtype=np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"{p.size} predictions for {t.size} labels")
    return {"pearson": pearson(p, t), "spearman": spearman(p, t),
            "mse": float(np.mean((p - t) ** 2)) if p.size else 0.0}


def main_score(record: dict, prefix: str = "") -> float | None:
    """The value of the record's main metric (`main_metric`, default accuracy), `prefix` "val_" for the
    validation split's."""
    return record.get(f"{prefix}{record.get('main_metric') or 'accuracy'}")
