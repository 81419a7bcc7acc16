"""Model quality: ranking, thresholded metrics, calibration, slices, robustness,
behaviour, and the paired comparison of a challenger with the champion."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import precision_recall_curve, roc_auc_score

from sluicegate.features.inputs import MISSING, numeric_inputs
from sluicegate.runtime import ModelInput
from sluicegate.spec import DatasetSpec

ECE_BINS = 15
MIN_SLICE_SUPPORT = 200  # rows below which a slice's metrics are reported but not trusted
MIN_SLICE_POSITIVES = 20  # positives below which a slice's PR-AUC is too noisy to gate on

Scorer = Callable[[ModelInput], np.ndarray]


# --- metrics --------------------------------------------------------------------------------------

def average_precision(y: np.ndarray, scores: np.ndarray) -> float:
    """PR-AUC as average precision (sklearn's definition), in one sort.

    Hand-written because the paired bootstrap calls it thousands of times and
    sklearn's version is about 5x slower on 30k rows.
    """
    positives = y.sum()
    if positives == 0 or positives == len(y):
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], y[order]
    # Collapse ties: precision/recall are evaluated at distinct thresholds only.
    last_of_run = np.r_[s[1:] != s[:-1], True]
    tp = np.cumsum(t)[last_of_run]
    seen = (np.arange(1, len(s) + 1))[last_of_run]
    precision = tp / seen
    recall_step = np.diff(np.r_[0.0, tp]) / positives
    return float(np.sum(precision * recall_step))


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
        "pr_auc": average_precision(y.astype(np.float64), scores) if both else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "ece": expected_calibration_error(y, scores),
        "label_rate": float(y.mean()),
        "rows": int(len(y)),
    }


# --- slices ---------------------------------------------------------------------------------------

def slice_groups(frame: pd.DataFrame, inputs: ModelInput, spec: DatasetSpec) -> dict[str, np.ndarray]:
    """Slice name -> group per row: the spec's slice columns, its numeric bands, and new against
    returning for each entity whose history can be missing."""
    groups = {column: frame[column].astype(str).to_numpy() for column in spec.slices.columns}
    for column, edges in spec.slices.bands.items():
        labels = [f"<{edges[0]:g}", *[f"{lo:g}-{hi:g}" for lo, hi in zip(edges, edges[1:], strict=False)],
                  f">={edges[-1]:g}"]
        bands = pd.cut(frame[column], bins=[-np.inf, *edges, np.inf], labels=labels, right=False)
        groups[f"{column}_band"] = bands.astype(str).to_numpy()
    names = numeric_inputs(spec)
    for entity, aggs in spec.aggregates_by_entity.items():
        first = next((a for a in aggs if a.may_be_missing), None)
        if first is not None:
            missing = inputs.numeric[:, names.index(first.feature_name + MISSING)] > 0.5
            groups[f"{entity}_history"] = np.where(missing, "new", "returning")
    return groups


def slice_metrics(groups: dict[str, np.ndarray], y: np.ndarray, scores: np.ndarray, threshold: float) -> list[dict]:
    """Metrics for every value of every slice, with support and whether it is large enough to gate on."""
    rows = []
    for column, values in groups.items():
        for value in pd.unique(values):
            mask = values == value
            m = classification_metrics(y[mask], scores[mask], threshold)
            positives = int(y[mask].sum())
            rows.append({"slice": column, "value": str(value), "support": int(mask.sum()), "positives": positives,
                         "trusted": bool(mask.sum() >= MIN_SLICE_SUPPORT and positives >= MIN_SLICE_POSITIVES),
                         **{k: m[k] for k in ("roc_auc", "pr_auc", "precision", "recall")}})
    return sorted(rows, key=lambda r: (r["slice"], -r["support"]))


# --- calibration ----------------------------------------------------------------------------------

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


def plot_reliability(table: list[dict], ece: float, path: Path) -> Path:
    """A reliability diagram: observed positive rate against mean predicted score per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.plot([r["mean_score"] for r in table], [r["observed_rate"] for r in table], "o-", label="model")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed positive rate")
    ax.set_title(f"Reliability (ECE {ece:.4f})")
    ax.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --- robustness and behaviour ---------------------------------------------------------------------

@dataclass
class Robustness:
    """PR-AUC drop under perturbations derived from the feature types."""

    drops: dict[str, float]  # noise: 10% of each numeric input's std; no_history: a tenth of the rows with
    # every aggregate at its no-history value; shuffled_<column>: one categorical column permuted across rows

    @property
    def worst(self) -> float:
        return max(self.drops.values(), default=0.0)

    def to_dict(self) -> dict:
        return dict(self.drops)


def robustness(score: Scorer, inputs: ModelInput, y: np.ndarray, base_pr_auc: float, spec: DatasetSpec,
               seed: int = 0) -> Robustness:
    # Each perturbed copy of the test window's inputs is scored and let go before the next is made.
    return Robustness({name: base_pr_auc - average_precision(y, score(x))
                       for name, x in _perturbations(inputs, spec, np.random.default_rng(seed))})


def _perturbations(inputs: ModelInput, spec: DatasetSpec, rng: np.random.Generator):
    """(name, perturbed inputs), one at a time, in a fixed order of random draws."""
    names = numeric_inputs(spec)
    values = [i for i, n in enumerate(names) if not n.endswith(MISSING)]
    if values:
        noisy = inputs.numeric.copy()
        noisy[:, values] += (rng.normal(0, 0.1, (len(inputs), len(values))).astype(np.float32)
                             * inputs.numeric[:, values].std(axis=0, keepdims=True))
        yield "noise", ModelInput(noisy, inputs.categorical)
        del noisy
    if spec.features.aggregates:  # as if a tenth of the rows came from entities never seen before
        cold = inputs.numeric.copy()
        rows = rng.random(len(inputs)) < COLD_SHARE
        for agg in spec.features.aggregates:
            cold[rows, names.index(agg.feature_name)] = 0.0  # a count of 0, or a missing value's 0
            if agg.may_be_missing:
                cold[rows, names.index(agg.feature_name + MISSING)] = 1.0
        yield "no_history", ModelInput(cold, inputs.categorical)
        del cold
    for i, column in enumerate(spec.categorical_features):
        shuffled = inputs.categorical.copy()
        shuffled[:, i] = rng.permutation(shuffled[:, i])
        yield f"shuffled_{column}", ModelInput(inputs.numeric, shuffled)
        del shuffled


@dataclass
class Behaviour:
    """The spec's behaviour checks: invariance (a small change to a raw column must not move the score by
    more than its max_shift) and direction (raising a feature by its step, default one standard deviation,
    must not move the score the other way by more than DIRECTION_TOLERANCE)."""

    checks: list[dict]  # one per check: kind, what, violation_rate, mean_delta, max_abs_delta

    @property
    def violation_rate(self) -> float:
        return max((c["violation_rate"] for c in self.checks), default=0.0)

    def to_dict(self) -> dict:
        return {"behaviour_violation_rate": self.violation_rate, "checks": self.checks}


DIRECTION_TOLERANCE = 0.05
COLD_SHARE = 0.1  # rows that lose their history in the no_history perturbation


def behaviour(score_frame: Callable[[pd.DataFrame], np.ndarray], frame: pd.DataFrame, spec: DatasetSpec) -> Behaviour:
    """Each check changes the rows (raw columns or features), rebuilds the model inputs the way training
    and serving do, and compares the scores."""
    base = score_frame(frame)
    checks = []
    for check in spec.behaviour.invariance:
        moved = frame.copy()
        moved[check.column] = moved[check.column] * (1 + check.relative_change)
        delta = score_frame(moved) - base
        checks.append(_check("invariance", f"{check.column} x{1 + check.relative_change:g}", delta,
                             np.abs(delta) > check.max_shift))
    for check in spec.behaviour.direction:
        moved, raised = frame.copy(), []
        for name in check.features:
            values = pd.to_numeric(moved[name], errors="coerce").astype("float64")
            step = check.step or float(np.nanstd(values)) or 1.0
            moved[name] = values + step
            raised.append(f"{name} +{step:.3g}")
        sign = 1.0 if check.direction == "increasing" else -1.0
        delta = (score_frame(moved) - base) * sign
        checks.append(_check("direction", f"{', '.join(raised)} ({check.direction})", delta,
                             delta < -DIRECTION_TOLERANCE))
    return Behaviour(checks)


def _check(kind: str, what: str, delta: np.ndarray, violated: np.ndarray) -> dict:
    return {"kind": kind, "what": what, "violation_rate": float(np.mean(violated)) if len(delta) else 0.0,
            "mean_delta": float(np.mean(delta)) if len(delta) else 0.0,
            "max_abs_delta": float(np.max(np.abs(delta))) if len(delta) else 0.0}


# --- champion against challenger ------------------------------------------------------------------

@dataclass
class Comparison:
    """Challenger minus champion PR-AUC on the same rows, with a paired bootstrap interval."""

    scope: str  # "overall" or "<slice>=<value>"
    support: int
    positives: int
    champion: float
    challenger: float
    diff: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict:
        return asdict(self)


def paired_bootstrap(y: np.ndarray, champion: np.ndarray, challenger: np.ndarray, samples: int,
                     confidence: float, seed: int = 0, scope: str = "overall") -> Comparison:
    """Resample rows (the same rows for both models) and take the percentile interval of the difference."""
    rng = np.random.default_rng(seed)
    n = len(y)
    diffs = np.empty(samples)
    for i in range(samples):
        idx = rng.integers(0, n, n)
        diffs[i] = average_precision(y[idx], challenger[idx]) - average_precision(y[idx], champion[idx])
    diffs = diffs[np.isfinite(diffs)]
    alpha = (1 - confidence) / 2
    a, b = average_precision(y, champion), average_precision(y, challenger)
    low, high = (np.quantile(diffs, [alpha, 1 - alpha]) if len(diffs) else (np.nan, np.nan))
    return Comparison(scope=scope, support=n, positives=int(y.sum()), champion=a, challenger=b, diff=b - a,
                      ci_low=float(low), ci_high=float(high))


def compare_with_champion(y: np.ndarray, champion: np.ndarray, challenger: np.ndarray, groups: dict[str, np.ndarray],
                   samples: int, confidence: float, min_support: int, min_positives: int) -> list[Comparison]:
    """Overall comparison first, then one per slice with enough support and positives."""
    out = [paired_bootstrap(y, champion, challenger, samples, confidence)]
    for column, values in groups.items():
        for value in pd.unique(values):
            mask = values == value
            if mask.sum() >= min_support and y[mask].sum() >= min_positives:
                out.append(paired_bootstrap(y[mask], champion[mask], challenger[mask], samples, confidence,
                                            scope=f"{column}={value}"))
    return out
