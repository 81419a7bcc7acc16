"""Model quality: ranking, thresholded metrics, calibration and slices."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from sluicegate.spec import DatasetSpec

ECE_BINS = 15
MIN_SLICE_SUPPORT = 200  # rows below which a slice's metrics are reported but not trusted


def choose_threshold(y_valid: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold that maximizes F1 on the validation window."""
    precision, recall, thresholds = precision_recall_curve(y_valid, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(thresholds[best]) if len(thresholds) else 0.5


def expected_calibration_error(y: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS) -> float:
    """Support-weighted gap between mean score and observed rate over equal-width bins."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    mean_score = np.bincount(which, weights=scores, minlength=bins)
    observed = np.bincount(which, weights=y, minlength=bins)
    used = counts > 0
    gaps = np.abs(mean_score[used] - observed[used]) / counts[used]
    return float(np.sum(gaps * counts[used]) / len(y))


def classification_metrics(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    y = np.asarray(y).astype(np.int64)
    pred = scores >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    both = len(np.unique(y)) == 2
    return {
        "roc_auc": float(roc_auc_score(y, scores)) if both else float("nan"),
        "pr_auc": float(average_precision_score(y, scores)) if both else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "ece": expected_calibration_error(y, scores),
        "label_rate": float(y.mean()),
        "rows": int(len(y)),
    }


def slice_metrics(frame: pd.DataFrame, y: np.ndarray, scores: np.ndarray, threshold: float,
                  spec: DatasetSpec) -> list[dict]:
    """Metrics for every value of every slice column named in the spec."""
    rows = []
    for column in spec.slices:
        values = frame[column].to_numpy()
        for value in pd.unique(values):
            mask = values == value
            m = classification_metrics(y[mask], scores[mask], threshold)
            rows.append({"slice": column, "value": str(value), "support": int(mask.sum()),
                         "positives": int(y[mask].sum()), "trusted": bool(mask.sum() >= MIN_SLICE_SUPPORT),
                         **{k: m[k] for k in ("roc_auc", "pr_auc", "precision", "recall")}})
    return sorted(rows, key=lambda r: (r["slice"], -r["support"]))


def reliability_table(y: np.ndarray, scores: np.ndarray, bins: int = ECE_BINS) -> list[dict]:
    """Per-bin mean score against observed rate: the data of a reliability diagram."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            out.append({"bin_low": float(edges[b]), "bin_high": float(edges[b + 1]),
                        "count": int(mask.sum()), "mean_score": float(scores[mask].mean()),
                        "observed_rate": float(y[mask].mean())})
    return out
