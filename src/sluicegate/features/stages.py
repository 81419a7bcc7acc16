"""The feature phase's entry point: feature tables, Feast registration and materialization,
and the point-in-time training set."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd

from sluicegate import compute
from sluicegate.config import Settings
from sluicegate.data.batches import read_history
from sluicegate.features import catalog, store
from sluicegate.features.inputs import python_features
from sluicegate.spec import DatasetSpec


@dataclass
class FeatureOutcome:
    frame: pd.DataFrame
    data_hash: str
    rows: int
    view_rows: dict[str, int]  # rows computed per Feast feature view
    history_rows: int  # earlier raw rows the windows reached back to
    feature_service: str
    seconds: float

    def summary(self) -> str:
        views = ", ".join(f"{n:,} {view} rows" for view, n in self.view_rows.items())
        reach = f"windows reached back over {self.history_rows:,} earlier rows; " if self.history_rows else ""
        return (f"features: {views} written; {reach}training set of {self.rows:,} rows from feature service "
                f"{self.feature_service} (hash {self.data_hash[:12]}) in {self.seconds:.1f}s")

    def params(self) -> dict[str, str]:
        return {"data_hash": self.data_hash, "feature_service": self.feature_service}

    def metrics(self) -> dict[str, float]:
        return {"training_rows": self.rows, **{f"{view}_rows": n for view, n in self.view_rows.items()}}


def feature_stage(settings: Settings, spec: DatasetSpec, rows: pd.DataFrame) -> FeatureOutcome:
    """The row view and the point-in-time aggregates through Feast (tables, registration,
    materialization of the online views, historical retrieval through the feature service), then the
    spec's Python features; the training set and its hash.

    Windows reach back into earlier raw batches (the newest partition of each day under raw/), so a
    batch never starts cold; the online store gets each entity's features as of the batch's end."""
    started = time.perf_counter()
    history, end = None, None
    if spec.features.aggregates:
        when = pd.to_datetime(rows[spec.timestamp], utc=True)
        history = read_history(settings.paths.raw, spec.timestamp, when.min() - store.history_reach(spec),
                               when.min(), store.history_columns(spec))
        end = when.max() + pd.Timedelta(seconds=1)  # the online rows: everything known at the batch's end
    tables = store.feature_tables(rows, spec, history, probe_at=end, settings=settings)
    store.write_feature_tables(tables, settings.paths.features, spec)
    view_rows = {view: len(t) for view, t in tables.items()}
    history_rows = 0 if history is None else len(history)
    del tables, history  # on disk now, where Feast reads them: not held through the join
    compute.release_free_memory()
    feast_store = store.feature_store(settings, spec)
    store.apply_definitions(feast_store, spec, settings)
    if end is not None:
        store.materialize(feast_store, (end + pd.Timedelta(seconds=1)).to_pydatetime())
    compute.release_free_memory()
    frame = store.training_frame(feast_store, rows, spec)
    if spec.features.python:
        frame[spec.features.python.outputs] = python_features(frame, spec)
    return FeatureOutcome(frame=frame, data_hash=store.frame_hash(frame), rows=len(frame),
                          view_rows=view_rows, history_rows=history_rows,
                          feature_service=catalog.feature_service(spec), seconds=time.perf_counter() - started)
