"""The model-input builder: raw transaction fields plus features -> model tensors.

Training, evaluation and serving all call `build_model_input`, so the model
sees the same transformation everywhere. Normalization lives inside the model
(and so inside the ONNX graph); this step only derives and encodes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from sluicegate.runtime import ModelInput
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




def cardinalities(spec: DatasetSpec) -> list[int]:
    """Embedding table sizes: one slot per known category plus 0 for unknown."""
    return [len(spec.categories(c)) + 1 for c in spec.categorical_features]


def build_model_input(columns: Mapping[str, ArrayLike], spec: DatasetSpec) -> ModelInput:
    """Derive model tensors from raw columns (named by the spec) and feature columns.

    `columns` is a DataFrame (training, evaluation, monitoring) or a dict of
    arrays (serving, where building a DataFrame per micro-batch cost more than
    the model call); only numpy operations follow, so both take the same path.
    """
    amount = _floats(columns[spec.amount])
    feats = {name: _feature(columns[name], default) for name, default in FEATURE_DEFAULTS.items()}
    has_history = ~np.isnan(feats["cust_amount_mean_7d"])
    usual = np.where(has_history, feats["cust_amount_mean_7d"], amount)
    usual = np.maximum(usual, 0.01)
    fraud_prior = float(np.mean(spec.label_rate))
    merch_rate = np.nan_to_num(feats["merch_fraud_rate_30d"], nan=fraud_prior)
    hour = utc_hour_of_day(columns[spec.timestamp])
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
        [encode_categories(columns[c], spec.categories(c)) for c in spec.categorical_features]
    )
    return ModelInput(numeric=numeric, categorical=categorical)


def encode_categories(values: ArrayLike, categories: list) -> np.ndarray:
    """Index into the spec's category list, shifted by one; unknown or missing -> 0."""
    codes = {c: i for i, c in enumerate(categories, start=1)}
    # A dict lookup per value: ~40x cheaper than pandas' hash join for a serving micro-batch,
    # ~1.6x dearer for 200k training rows (19 ms against 12 ms a column).
    listed = values.tolist() if hasattr(values, "tolist") else list(values)
    return np.array([codes.get(v, 0) for v in listed], dtype=np.int64)


def utc_hour_of_day(values: ArrayLike) -> np.ndarray:
    """Hour of day in UTC with its fraction (05:30 -> 5.5). Naive timestamps are taken as UTC;
    aware ones (a tz-aware column) are converted to UTC by numpy's datetime64 view."""
    ns = np.asarray(values, dtype="datetime64[ns]").astype(np.int64)
    minutes = (ns // 60_000_000_000) % (24 * 60)  # whole minutes, as the hour + minute/60 it replaces
    return minutes / 60.0


def _floats(values: ArrayLike) -> np.ndarray:
    if isinstance(values, pd.Series):  # nullable columns hold pd.NA, which numpy cannot cast
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.asarray(values, dtype=np.float64)


def _feature(values: ArrayLike, default: float) -> np.ndarray:
    values = _floats(values)
    return np.where(np.isnan(values), default, values) if not np.isnan(default) else values
