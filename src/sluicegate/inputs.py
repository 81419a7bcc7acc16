"""The model-input builder: raw transaction fields plus features -> model tensors.

Training, evaluation and serving all call `build_model_input`, so the model
sees the same transformation everywhere. Normalization lives inside the model
(and so inside the ONNX graph); this step only derives and encodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from sluicegate.spec import DatasetSpec

# Value a feature takes when an entity has no history yet.
FEATURE_DEFAULTS: dict[str, float] = {
    "cust_txn_count_1h": 0.0,
    "cust_txn_count_24h": 0.0,
    "cust_amount_mean_7d": np.nan,  # filled with the transaction's own amount
    "cust_amount_std_7d": 0.0,
    "cust_minutes_since_prev": 7 * 24 * 60.0,
    "merch_txn_count_24h": 0.0,
    "merch_fraud_rate_30d": np.nan,  # filled with the middle of the spec's label-rate band
}

NUMERIC_INPUTS: list[str] = [
    "log_amount", "log_amount_to_usual", "log_cust_count_1h", "log_cust_count_24h",
    "cust_amount_cv_7d", "log_minutes_since_prev", "has_history", "log_merch_count_24h",
    "merch_fraud_rate_30d", "hour_sin", "hour_cos", "is_night",
]


@dataclass
class ModelInput:
    numeric: np.ndarray  # float32 [N, len(NUMERIC_INPUTS)]
    categorical: np.ndarray  # int64 [N, len(spec.categorical_features)], 0 = unknown

    def __len__(self) -> int:
        return len(self.numeric)

    def take(self, index: np.ndarray) -> ModelInput:
        return ModelInput(self.numeric[index], self.categorical[index])


def cardinalities(spec: DatasetSpec) -> list[int]:
    """Embedding table sizes: one slot per known category plus 0 for unknown."""
    return [len(spec.categories(c)) + 1 for c in spec.categorical_features]


def build_model_input(frame: pd.DataFrame, spec: DatasetSpec) -> ModelInput:
    """Derive model tensors from raw columns (named by the spec) and feature columns."""
    amount = frame[spec.amount].to_numpy(dtype=np.float64)
    feats = {name: _feature(frame, name, default) for name, default in FEATURE_DEFAULTS.items()}
    has_history = ~np.isnan(feats["cust_amount_mean_7d"])
    usual = np.where(has_history, feats["cust_amount_mean_7d"], amount)
    usual = np.maximum(usual, 0.01)
    fraud_prior = float(np.mean(spec.label_rate))
    merch_rate = np.nan_to_num(feats["merch_fraud_rate_30d"], nan=fraud_prior)
    ts = pd.to_datetime(frame[spec.timestamp], utc=True).dt
    hour = ts.hour.to_numpy() + ts.minute.to_numpy() / 60.0
    angle = 2 * np.pi * hour / 24.0
    numeric = np.column_stack([
        np.log1p(amount),
        np.log(np.maximum(amount, 0.01) / usual),
        np.log1p(feats["cust_txn_count_1h"]),
        np.log1p(feats["cust_txn_count_24h"]),
        feats["cust_amount_std_7d"] / usual,
        np.log1p(np.maximum(feats["cust_minutes_since_prev"], 0.0)),
        has_history.astype(np.float64),
        np.log1p(feats["merch_txn_count_24h"]),
        merch_rate,
        np.sin(angle),
        np.cos(angle),
        (hour < 6).astype(np.float64),
    ]).astype(np.float32)
    categorical = np.column_stack(
        [encode_categories(frame[c], spec.categories(c)) for c in spec.categorical_features]
    )
    return ModelInput(numeric=numeric, categorical=categorical)


def encode_categories(values: pd.Series, categories: list) -> np.ndarray:
    """Index into the spec's category list, shifted by one; unknown -> 0."""
    codes = pd.Categorical(values, categories=categories).codes.astype(np.int64)
    return codes + 1


def _feature(frame: pd.DataFrame, name: str, default: float) -> np.ndarray:
    values = frame[name].to_numpy(dtype=np.float64, na_value=np.nan)
    return np.where(np.isnan(values), default, values) if not np.isnan(default) else values
