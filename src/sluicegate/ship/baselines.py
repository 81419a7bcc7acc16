"""The obvious models a candidate must beat: a logistic regression and scikit-learn's
HistGradientBoostingClassifier, trained on the same split and the same model inputs.

Their PR-AUC goes into the gate report and the model card, and their test-window scores into the
held-out table, so the gate `min_lift_over_baseline` compares the candidate with the best of them on
the same rows (a paired bootstrap). Default settings, as a reviewer would try them first; the best is
picked on the validation window, never on the test window that then grades it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from sluicegate.runtime import ModelInput

MAX_HGB_CATEGORIES = 255  # HistGradientBoosting's limit per categorical column (its max_bins)
# Training rows the baselines fit on; a seeded sample beyond. Bounds their time and memory on a 10M-row
# table (a float64 copy of 7M training rows is 1.4 GB before the one-hot encoding).
MAX_TRAIN_ROWS = 500_000


@dataclass
class Baseline:
    """One baseline model's figures; its test-window scores stay out of the evidence JSON."""

    name: str
    valid_pr_auc: float
    test_pr_auc: float
    seconds: float
    test_scores: np.ndarray = field(repr=False, default_factory=lambda: np.empty(0))

    def to_dict(self) -> dict:
        return {"name": self.name, "valid_pr_auc": self.valid_pr_auc, "test_pr_auc": self.test_pr_auc,
                "seconds": round(self.seconds, 2)}


def _design(inputs: ModelInput) -> np.ndarray:
    """Numeric inputs then categorical codes, as one float matrix."""
    return np.hstack([inputs.numeric.astype(np.float64), inputs.categorical.astype(np.float64)])


def _logistic(n_numeric: int, n_categorical: int, seed: int):
    numeric, categorical = list(range(n_numeric)), list(range(n_numeric, n_numeric + n_categorical))
    columns = ColumnTransformer([("numeric", StandardScaler(), numeric),
                                 ("categorical", OneHotEncoder(handle_unknown="ignore"), categorical)])
    return make_pipeline(columns, LogisticRegression(max_iter=1000, random_state=seed))


def _boosting(n_numeric: int, cardinalities: list[int], seed: int):
    # Codes of a column with more categories than HistGradientBoosting can bin are taken as numbers.
    mask = [False] * n_numeric + [c <= MAX_HGB_CATEGORIES for c in cardinalities]
    return HistGradientBoostingClassifier(categorical_features=mask if any(mask) else None, random_state=seed)


BUILDERS: dict[str, Callable] = {
    "logistic_regression": lambda n, cards, seed: _logistic(n, len(cards), seed),
    "hist_gradient_boosting": _boosting,
}


def fit_baselines(train: ModelInput, y_train: np.ndarray, valid: ModelInput, y_valid: np.ndarray,
                  test: ModelInput, y_test: np.ndarray, cardinalities: list[int], seed: int = 0) -> list[Baseline]:
    """Each baseline fitted on the training window and scored on validation and test."""
    train, y_train = _sample(train, y_train, seed)
    x_train, x_valid, x_test = _design(train), _design(valid), _design(test)
    out = []
    for name, build in BUILDERS.items():
        started = time.perf_counter()
        model = build(train.numeric.shape[1], cardinalities, seed).fit(x_train, y_train)
        valid_scores = model.predict_proba(x_valid)[:, 1]
        test_scores = model.predict_proba(x_test)[:, 1]
        out.append(Baseline(name, float(average_precision_score(y_valid, valid_scores)),
                            float(average_precision_score(y_test, test_scores)), time.perf_counter() - started,
                            test_scores.astype(np.float32)))
    return out


def _sample(inputs: ModelInput, y: np.ndarray, seed: int) -> tuple[ModelInput, np.ndarray]:
    if len(y) <= MAX_TRAIN_ROWS:
        return inputs, y
    rows = np.sort(np.random.default_rng(seed).choice(len(y), MAX_TRAIN_ROWS, replace=False))
    return inputs.take(rows), y[rows]


def best(baselines: list[Baseline] | list[dict]) -> str | None:
    """The name of the baseline with the highest validation PR-AUC."""
    rows = [b.to_dict() if isinstance(b, Baseline) else b for b in baselines]
    return max(rows, key=lambda b: b["valid_pr_auc"])["name"] if rows else None
