"""Skew in production: once the raw events of a served period land (`import`, `ingest` or the next
batch), their model inputs are recomputed offline, as training computes them (the raw rows, windows
reaching back into earlier batches, the spec's Python features, the same input builder), and compared
row by row with the inputs the server logged for the same ids under `/predict`.

The serving-parity gate proves the serving path on the candidate's test window before promotion; this
checks what was actually served after it: a client that sent other values than the ones that landed,
an online state that missed events, a clock that was off. The comparison is of the model's input
tensors (`input.<name>` in the prediction log), so it covers raw columns, transforms, aggregates and
Python features alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from sluicegate.config import Settings
from sluicegate.data.batches import Partition, list_partitions, read_history
from sluicegate.features import aggregates, catalog
from sluicegate.features.inputs import build_model_input, logged_inputs, python_features
from sluicegate.operate import monitor as mon
from sluicegate.runtime import ModelInput
from sluicegate.serve import privacy
from sluicegate.ship.serving_parity import FeatureSkew, feature_skew
from sluicegate.spec import DatasetSpec

PREDICT = "predict"  # the endpoint whose rows carry the request's id (v2 rows have none)
# How far back, in logging time, a landed partition's served rows are looked for: a batch lands days
# after its events were served, not weeks.
LOOKBACK = pd.Timedelta(days=7)


@dataclass
class ProductionSkew:
    partitions: list[str]  # landed day partitions checked ("batch/day")
    served: int  # logged /predict rows whose event is in them
    features: list[FeatureSkew] = field(default_factory=list)

    @property
    def skewed(self) -> list[FeatureSkew]:
        return [f for f in sorted(self.features, key=lambda f: -f.differing) if f.differing > 0]

    def detail(self) -> str:
        where = f"{len(self.partitions)} landed partition(s) ({', '.join(self.partitions[:4])}" + (
            ", ...)" if len(self.partitions) > 4 else ")")
        if not self.served:
            return f"{where}: none of their rows was served through /predict"
        if not self.skewed:
            return f"{where}: every model input equal on all {self.served:,} served rows"
        return f"{where}: " + "; ".join(f"{f.name} differs on {f.differing:.2%} of {self.served:,} served rows "
                                        f"(largest gap {f.largest_gap:.4g})" for f in self.skewed)

    def to_dict(self) -> dict:
        return {"partitions": self.partitions, "served": self.served, "detail": self.detail(),
                "skewed": [f.name for f in self.skewed], "features": [asdict(f) for f in self.features]}


def landed_since(settings: Settings, checked: dict[str, float]) -> list[Partition]:
    """Day partitions written since they were last checked (a replaced day is checked again)."""
    return [p for p in list_partitions(settings.paths.raw) if checked.get(_name(p), -1.0) < p.written]


def production_skew(settings: Settings, spec: DatasetSpec, checked: dict[str, float],
                    on_this_spec: Callable[[str], bool]) -> ProductionSkew | None:
    """Compare each newly landed partition's served rows with their offline inputs; `checked` (the
    monitor's state: partition -> the write time checked) is updated. Only rows of model versions
    trained on this spec are compared (`on_this_spec(version)`): another spec's champion read other
    inputs, by its own contract. None when nothing new landed or the table has no id (served rows
    cannot be matched to landed ones)."""
    parts = landed_since(settings, checked)
    if not parts or not spec.id:
        return None
    since = pd.Timestamp(min(p.written for p in parts), unit="s", tz="UTC") - LOOKBACK
    log = mon.read_prediction_log(settings.paths.predictions, since).frame
    if mon.ENDPOINT in log.columns:
        log = log[log[mon.ENDPOINT] == PREDICT]
    if len(log) and "model_version" in log.columns:
        versions = {v: on_this_spec(str(v)) for v in log["model_version"].dropna().unique()}
        log = log[log["model_version"].map(versions).fillna(False).astype(bool)]
    report = ProductionSkew(partitions=[_name(p) for p in parts], served=0)
    # Events are served before they land: a partition written before the oldest logged row holds none.
    first = log[mon.LOGGED_AT].min().timestamp() if len(log) else float("inf")
    served, offline = [], []
    for part in parts:
        checked[_name(part)] = part.written
        pair = _served_and_offline(settings, spec, part, log) if part.written >= first else None
        if pair is not None:
            served.append(pair[0])
            offline.append(pair[1])
    if served:
        report.served = sum(len(s) for s in served)
        report.features = compare(pd.concat(served, ignore_index=True), _stack(offline), spec)
    return report


def _served_and_offline(settings: Settings, spec: DatasetSpec, part: Partition, log: pd.DataFrame
                        ) -> tuple[pd.DataFrame, ModelInput] | None:
    """The partition's served rows as logged, and their inputs recomputed offline, row for row."""
    if "request_id" not in log.columns or log.empty:
        return None
    rows = pd.concat([pd.read_parquet(f) for f in sorted(part.path.glob("*.parquet"))], ignore_index=True)
    ids = _logged_ids(settings, spec, rows[spec.id])
    position = pd.Series(np.arange(len(rows)), index=ids.to_numpy())
    position = position[~position.index.duplicated(keep="last")]
    matched = log[log["request_id"].isin(position.index)]
    if matched.empty:
        return None
    inputs = offline_inputs(settings, spec, rows)
    at = position.loc[matched["request_id"].to_numpy()].to_numpy()
    return matched.reset_index(drop=True), ModelInput(inputs.numeric[at], inputs.categorical[at])


def offline_inputs(settings: Settings, spec: DatasetSpec, rows: pd.DataFrame) -> ModelInput:
    """The rows' model inputs as training builds them: aggregates as of each row (windows reaching into
    earlier raw batches, the newest partition of each day), joined on (key, timestamp) as the
    point-in-time join does, then the Python features and the shared input builder."""
    frame = rows.copy()
    if catalog.served_entities(spec):
        frame[spec.timestamp] = aggregates.as_utc(frame[spec.timestamp])
        start = frame[spec.timestamp].min()
        history = read_history(settings.paths.raw, spec.timestamp, start - aggregates.history_reach(spec), start,
                               aggregates.history_columns(spec))
        for table in aggregates.compute_feature_tables(rows, spec, history, settings).values():
            key = table.columns[0]  # each entity table is (key, timestamp, its aggregates...)
            frame = frame.merge(table, on=[key, spec.timestamp], how="left", suffixes=("", "__view"))
    if spec.features.python:
        frame[spec.features.python.outputs] = python_features(frame, spec)
    return build_model_input(frame, spec)


def compare(log: pd.DataFrame, offline: ModelInput, spec: DatasetSpec) -> list[FeatureSkew]:
    """Each logged input column against its offline value; rows whose champion did not read that input
    (another input contract: nothing logged there) are left out of its share, and so are the inputs
    of personal data, which the log does not keep (`serve.privacy`)."""
    names = logged_inputs(spec)
    out = []
    for tensor, block in (("numeric", offline.numeric), ("categorical", offline.categorical)):
        for j, column in enumerate(names[tensor]):
            if column not in log.columns:
                continue
            logged = pd.to_numeric(log[column], errors="coerce")
            kept = logged.notna().to_numpy()
            if kept.any():
                out.append(feature_skew(column, logged[kept], pd.Series(block[kept, j])))
    return out


def _logged_ids(settings: Settings, spec: DatasetSpec, ids: pd.Series) -> pd.Series:
    """The ids as the log holds them: their text, or their token when the id is personal data."""
    if spec.id in spec.pii_columns:
        return pd.Series(privacy.pseudonyms(spec, settings.paths).tokens(ids), index=ids.index)
    return ids.map(lambda v: None if pd.isna(v) else str(v))


def _stack(parts: list[ModelInput]) -> ModelInput:
    return ModelInput(np.concatenate([p.numeric for p in parts]), np.concatenate([p.categorical for p in parts]))


def _name(part: Partition) -> str:
    return f"{part.batch_id}/{part.day}"
