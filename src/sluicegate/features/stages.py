"""The feature phase's entry point: feature tables, Feast registration, the online state reconciled
with the batch, and the point-in-time training set."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pandas as pd

from sluicegate import compute
from sluicegate.config import Settings
from sluicegate.data.batches import read_history
from sluicegate.features import aggregates, catalog, definitions, lineage, online, retrieval, tables
from sluicegate.features.inputs import python_features
from sluicegate.spec import DatasetSpec


@dataclass
class FeatureOutcome:
    frame: pd.DataFrame
    data_hash: str
    rows: int
    view_rows: dict[str, int]  # rows computed per Feast feature view
    history_rows: int  # earlier raw rows the windows reached back to
    online_events: int  # events the online state holds from this batch and its history
    feature_service: str
    seconds: float

    def summary(self) -> str:
        views = ", ".join(f"{n:,} {view} rows" for view, n in self.view_rows.items())
        reach = f"windows reached back over {self.history_rows:,} earlier rows; " if self.history_rows else ""
        reach += f"online state reconciled with {self.online_events:,} events; " if self.online_events else ""
        return (f"features: {views} written; {reach}training set of {self.rows:,} rows from feature service "
                f"{self.feature_service} (hash {self.data_hash[:12]}) in {self.seconds:.1f}s")

    def params(self) -> dict[str, str]:
        return {"data_hash": self.data_hash, "feature_service": self.feature_service}

    def metrics(self) -> dict[str, float]:
        return {"training_rows": self.rows, **{f"{view}_rows": n for view, n in self.view_rows.items()}}


def feature_stage(settings: Settings, spec: DatasetSpec, rows: pd.DataFrame) -> FeatureOutcome:
    """The row view and the point-in-time aggregates through Feast (tables, registration, historical
    retrieval through the feature service), then the spec's Python features; the training set and its
    hash.

    Windows reach back into earlier raw batches (the newest partition of each day under raw/), so a
    batch never starts cold; the online state (`features.online`) has the days this batch and that
    history cover replaced by them, so serving counts what training counts."""
    started = time.perf_counter()
    history = None
    if spec.features.aggregates:
        when = pd.to_datetime(rows[spec.timestamp], utc=True)
        history = read_history(settings.paths.raw, spec.timestamp, when.min() - aggregates.history_reach(spec),
                               when.min(), aggregates.history_columns(spec))
    feature_tables = aggregates.feature_tables(rows, spec, history, settings=settings)
    tables.write_feature_tables(feature_tables, settings.paths.features, spec)
    view_rows = {view: len(t) for view, t in feature_tables.items()}
    history_rows = 0 if history is None else len(history)
    del feature_tables  # on disk now, where Feast reads them: not held through the join
    online_events = reconcile_online(settings, spec, rows, history) if catalog.served_entities(spec) else 0
    del history
    compute.release_free_memory()
    feast_store = definitions.feature_store(settings, spec)
    definitions.apply_definitions(feast_store, spec, settings)
    frame = retrieval.training_frame(feast_store, rows, spec)
    if spec.features.python:
        frame[spec.features.python.outputs] = python_features(frame, spec)
    return FeatureOutcome(frame=frame, data_hash=lineage.frame_hash(frame), rows=len(frame),
                          view_rows=view_rows, history_rows=history_rows, online_events=online_events,
                          feature_service=catalog.feature_service(spec), seconds=time.perf_counter() - started)


def reconcile_online(settings: Settings, spec: DatasetSpec, rows: pd.DataFrame, history: pd.DataFrame | None) -> int:
    """The online state's days that `rows` and `history` cover, replaced by them."""
    columns = [c for c in dict.fromkeys([*([spec.id] if spec.id else []), *aggregates.history_columns(spec)])
               if c in rows]
    events = rows[columns] if history is None or history.empty else pd.concat(
        [history[[c for c in columns if c in history]], rows[columns]], ignore_index=True)
    state = online.open_state(settings, spec)
    try:
        return online.OnlineFeatures(spec, state).reconcile(events)
    finally:
        state.close()
