"""The feature phase's entry point: feature tables, Feast registration and materialization,
and the point-in-time training set."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd

from sluicegate.config import Settings
from sluicegate.features import catalog, store
from sluicegate.features.inputs import python_features
from sluicegate.spec import DatasetSpec


@dataclass
class FeatureOutcome:
    frame: pd.DataFrame
    data_hash: str
    rows: int
    view_rows: dict[str, int]  # rows written per Feast feature view
    feature_service: str
    seconds: float

    def summary(self) -> str:
        views = ", ".join(f"{n:,} {view} rows" for view, n in self.view_rows.items())
        return (f"features: {views} written; training set of {self.rows:,} rows from feature service "
                f"{self.feature_service} (hash {self.data_hash[:12]}) in {self.seconds:.1f}s")

    def params(self) -> dict[str, str]:
        return {"data_hash": self.data_hash, "feature_service": self.feature_service}

    def metrics(self) -> dict[str, float]:
        return {"training_rows": self.rows, **{f"{view}_rows": n for view, n in self.view_rows.items()}}


def feature_stage(settings: Settings, spec: DatasetSpec, rows: pd.DataFrame) -> FeatureOutcome:
    """The row view and the point-in-time aggregates through Feast (tables, registration,
    materialization of the online views, historical retrieval through the feature service), then the
    spec's Python features; the training set and its hash."""
    started = time.perf_counter()
    tables = store.feature_tables(rows, spec)
    store.write_feature_tables(tables, settings.paths.features, spec)
    feast_store = store.feature_store(settings, spec)
    store.apply_definitions(feast_store, spec, settings)
    if spec.timestamp:
        end = pd.to_datetime(rows[spec.timestamp], utc=True).max() + pd.Timedelta(seconds=1)
        store.materialize(feast_store, end.to_pydatetime())
    frame = store.training_frame(feast_store, rows, spec)
    if spec.features.python:
        frame[spec.features.python.outputs] = python_features(frame, spec)
    return FeatureOutcome(frame=frame, data_hash=store.frame_hash(frame), rows=len(frame),
                          view_rows={view: len(t) for view, t in tables.items()},
                          feature_service=catalog.feature_service(spec), seconds=time.perf_counter() - started)
