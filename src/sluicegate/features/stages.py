"""The feature phase's entry point: feature tables, Feast registration and materialization,
and the point-in-time training set."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd

from sluicegate.config import Settings
from sluicegate.features import catalog
from sluicegate.features import store as features
from sluicegate.spec import DatasetSpec


@dataclass
class FeatureOutcome:
    frame: pd.DataFrame
    data_hash: str
    rows: int
    customer_rows: int
    merchant_rows: int
    seconds: float

    def summary(self) -> str:
        return (f"features: {self.customer_rows:,} customer and {self.merchant_rows:,} merchant rows "
                f"materialized; training set of {self.rows:,} rows (hash {self.data_hash[:12]}) "
                f"in {self.seconds:.1f}s")

    def params(self) -> dict[str, str]:
        return {"data_hash": self.data_hash, "feature_service": catalog.FEATURE_SERVICE}

    def metrics(self) -> dict[str, float]:
        return {"training_rows": self.rows, "customer_feature_rows": self.customer_rows,
                "merchant_feature_rows": self.merchant_rows}


def feature_stage(settings: Settings, spec: DatasetSpec, transactions: pd.DataFrame) -> FeatureOutcome:
    """Transform, register with Feast, materialize online, build the point-in-time training set."""
    started = time.perf_counter()
    customer, merchant = features.compute_feature_tables(transactions, spec)
    features.write_feature_tables(customer, merchant, settings.paths.features)
    store = features.feature_store(settings)
    features.apply_definitions(store, settings)
    end = pd.to_datetime(transactions[spec.timestamp], utc=True).max() + pd.Timedelta(seconds=1)
    features.materialize(store, end.to_pydatetime())
    frame = features.training_frame(store, transactions, spec)
    return FeatureOutcome(frame=frame, data_hash=features.frame_hash(frame), rows=len(frame),
                          customer_rows=len(customer), merchant_rows=len(merchant),
                          seconds=time.perf_counter() - started)
