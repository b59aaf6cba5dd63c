"""Accuracy, per-class and macro F1 from integer labels (numpy only)."""

from __future__ import annotations

import numpy as np


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, object]:
    """Accuracy, per-class F1 and macro-F1.

    ``f1`` is NaN for a class absent from both truth and prediction; ``macro_f1`` averages over the
    classes present in ``y_true``.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    tp = np.bincount(y_true[y_true == y_pred], minlength=n_classes).astype(np.float64)
    n_true = np.bincount(y_true, minlength=n_classes).astype(np.float64)
    n_pred = np.bincount(y_pred, minlength=n_classes).astype(np.float64)
    denom = n_true + n_pred
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(denom > 0, 2 * tp / denom, np.nan)
    present = n_true > 0
    return {
        "accuracy": float((y_true == y_pred).mean()) if y_true.size else float("nan"),
        "macro_f1": float(np.nanmean(np.where(present, np.nan_to_num(f1), np.nan))) if present.any() else float("nan"),
        "f1": f1,
    }
