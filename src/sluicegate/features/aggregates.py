"""Point-in-time aggregates from raw events: the offline half of each feature's one definition.

Each feature row is keyed by (entity id, event timestamp) and holds what was known just BEFORE that
timestamp: only strictly earlier events count, and a label counts only once it is known,
`table.label_delay` after its event. Because every event has a feature row at its own timestamp, the
point-in-time join (feature ts <= event ts) picks exactly that row, so a training row never sees
itself or anything later. `features.online` computes the same values per event at serving.
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd
from pandas.api.indexers import BaseIndexer

from sluicegate import compute
from sluicegate.config import Settings
from sluicegate.features import catalog
from sluicegate.spec import Aggregate, DatasetSpec

LABEL = "__positive"  # the label as 1.0 / 0.0, for label rates
# The row view's constant instant when the table has no timestamp.
ROW_INSTANT = pd.Timestamp("1970-01-02", tz="UTC")


def compute_feature_tables(rows: pd.DataFrame, spec: DatasetSpec, history: pd.DataFrame | None = None,
                           settings: Settings | None = None) -> dict[str, pd.DataFrame]:
    """One table per entity view: one row per distinct (key, timestamp) of `rows`, with that entity's
    aggregates as of just before the timestamp (labels only once known, `table.label_delay` after
    their event).

    `history`: earlier raw rows (before the first of `rows`), so windows reach back across batches;
    they shape the features but get no rows of their own.

    Each entity's events are cut into shards of about `settings.feature_shard_rows` rows by a hash of
    the key:
    every aggregate is per entity, so the shards' tables together are exactly the whole table, and
    each shard's sort and windows cost O(s log s), so the cost per row stays flat as the table grows.
    The shards run where `settings` says (`sluicegate.compute`: here, or on a Dask cluster).
    """
    ts = spec.timestamp
    settings = settings or Settings()
    with_history = history is not None and len(history) > 0
    start = as_utc(rows[ts]).min() if with_history else None
    tables = {}
    for entity in catalog.served_entities(spec):
        key = spec.entities[entity].key
        aggs = spec.aggregates_by_entity[entity]
        values = sorted({a.column for a in aggs if a.column})
        frame = _events(rows, spec, key, values, aggs)
        if with_history:
            frame = pd.concat([_events(history, spec, key, values, aggs), frame], ignore_index=True)
        shards = key_shards(frame, key, settings.feature_shard_rows)
        build = functools.partial(_entity_table, key=key, ts=ts, aggs=aggs, spec=spec)
        parts = compute.map_items(settings, build, shards)
        table = parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)
        if with_history:  # history rows shape the windows but are not rows of this batch
            table = table[table[ts] >= start].reset_index(drop=True)
        tables[catalog.entity_view(entity)] = table
    return tables


def key_shards(frame: pd.DataFrame, key: str, shard_rows: int) -> list[pd.DataFrame]:
    """The frame cut into about len/shard_rows parts by `key`: every key in exactly one."""
    count = -(-len(frame) // shard_rows)
    # Integer codes of the key (pyarrow strings factorized without Python objects), not a hash per row.
    return _shards(frame, pd.factorize(frame[key])[0], count) if count > 1 else [frame]


def _shards(frame: pd.DataFrame, codes: np.ndarray, count: int) -> list[pd.DataFrame]:
    """`count` parts of frame by its key codes: a key's rows all in one part."""
    which = codes % count
    return [frame[which == i] for i in range(count)]


def _events(rows: pd.DataFrame, spec: DatasetSpec, key: str, values: list[str], aggs: list[Aggregate]) -> pd.DataFrame:
    frame = rows[[key, spec.timestamp, *values]].copy()
    frame[spec.timestamp] = as_utc(frame[spec.timestamp])
    if any(a.agg == "label_rate" for a in aggs):
        frame[LABEL] = spec.positive(rows[spec.label]).to_numpy()
    return frame


def history_columns(spec: DatasetSpec) -> list[str]:
    """The raw columns the aggregates read: what the feature stage reads of earlier batches."""
    keys = [spec.entities[e].key for e in catalog.served_entities(spec)]
    values = sorted({a.column for a in spec.features.aggregates if a.column})
    label = [spec.label] if any(a.agg == "label_rate" for a in spec.features.aggregates) else []
    return list(dict.fromkeys([*keys, spec.timestamp, *values, *label]))


def history_reach(spec: DatasetSpec) -> pd.Timedelta:
    """How far before a batch its windows reach: the longest one (time since previous sees that far)."""
    return max([pd.Timedelta(a.window) for a in spec.features.aggregates if a.window] + [pd.Timedelta(days=1)])


def feature_tables(rows: pd.DataFrame, spec: DatasetSpec, history: pd.DataFrame | None = None,
                   settings: Settings | None = None) -> dict[str, pd.DataFrame]:
    """Every view's table: the row view's, then each entity's aggregates."""
    return {catalog.row_view(): row_table(rows, spec), **compute_feature_tables(rows, spec, history, settings)}


def row_table(rows: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """The row view's table: each row's own raw model columns under its id and timestamp."""
    table = rows[[spec.id, *catalog.row_features(spec)]].copy()
    when = as_utc(rows[spec.timestamp]) if spec.timestamp else pd.Series(ROW_INSTANT, index=rows.index)
    table.insert(1, catalog.row_timestamp(spec), when.dt.as_unit("ns") if spec.timestamp else when)
    return table


def as_utc(ts: pd.Series) -> pd.Series:
    """In UTC, in ns: one unit everywhere (merge_asof refuses to match us against ns)."""
    if isinstance(ts.dtype, pd.DatetimeTZDtype):  # pd.to_datetime first caches the distinct values: 1 s at 10M
        return ts.dt.tz_convert("UTC").dt.as_unit("ns")
    return pd.to_datetime(ts, utc=True).dt.as_unit("ns")


def _entity_table(frame: pd.DataFrame, key: str, ts: str, aggs: list[Aggregate], spec: DatasetSpec) -> pd.DataFrame:
    df = frame.sort_values([key, ts], kind="stable").reset_index(drop=True)
    df["_one"] = 1.0
    out = df[[key, ts]].copy()
    windows: dict[tuple, object] = {}  # one rolling window per (length, column), shared by its statistics
    for agg in aggs:
        if agg.agg in ("count", "sum", "mean", "std", "min", "max"):
            column = "_one" if agg.agg == "count" else agg.column
            at = (_window(agg), column)
            window = windows.get(at)
            if window is None:
                window = windows[at] = _rolling_before(df, key, ts, *at)
            out[agg.feature_name] = getattr(window, "sum" if agg.agg == "count" else agg.agg)().to_numpy()
    # Rows sharing (key, ts) have the same features: keep the first.
    out = out.drop_duplicates([key, ts], keep="first").reset_index(drop=True)
    for agg in aggs:
        if agg.agg == "time_since_previous":  # seconds since the key's previous distinct timestamp
            previous = out.groupby(key, sort=False)[ts].shift(1)
            out[agg.feature_name] = (out[ts] - previous).dt.total_seconds()
        elif agg.agg == "label_rate":
            out[agg.feature_name] = _lagged_label_rate(df, out, key, ts, _window(agg), spec.label_delay)
    return _with_dtypes(out, [key, ts], aggs)


def _window(agg: Aggregate) -> pd.Timedelta:
    return pd.Timedelta(agg.window)


def _rolling_before(df: pd.DataFrame, key: str, ts: str, window: pd.Timedelta, column: str):
    """Rolling window [t - window, t) per key; df must be sorted by (key, ts).

    The window bounds pandas' `groupby(key).rolling(window, on=ts, closed="left")` uses, found for all
    keys at once (`_bounds_before`), so pandas' own kernels compute the same values: that groupby
    builds and checks each key's bounds in a Python loop, most of the transformation's time. Rows
    sharing a timestamp see only earlier rows."""
    start, end = _bounds_before(df[key], df[ts], window)
    return df[column].rolling(_Bounds(start=start, end=end), min_periods=1)


class _Bounds(BaseIndexer):
    """Window bounds given up front."""

    def get_window_bounds(self, num_values=0, min_periods=None, center=None, closed=None, step=None):
        return self.start, self.end


def _bounds_before(keys: pd.Series, times: pd.Series, window: pd.Timedelta) -> tuple[np.ndarray, np.ndarray]:
    """For each row of a frame sorted by (key, time): its key's first row no older than `window`
    (start) and its key's first row at its own time (end, exclusive). One sorted search over
    (key, rank of time): a time's rank is how many of the frame's times are earlier, which orders
    any two instants as they are ordered, and fits beside the key's code in one int64."""
    codes = pd.factorize(keys)[0].astype(np.int64)  # sorted keys: codes ascend
    ns = times.array.asi8
    ranked = np.sort(ns)
    scale = len(ns) + 1
    at = codes * scale + np.searchsorted(ranked, ns)
    start = np.searchsorted(at, codes * scale + np.searchsorted(ranked, ns - window.value))
    first = np.r_[True, at[1:] != at[:-1]]  # the first row at each (key, time): ties are left out
    end = np.maximum.accumulate(np.where(first, np.arange(len(at)), 0))
    return start, end


def _lagged_label_rate(df: pd.DataFrame, keys: pd.DataFrame, key: str, ts: str, window: pd.Timedelta,
                       delay: pd.Timedelta) -> np.ndarray:
    """Positive share over rows with t - window <= ts <= t - delay, per (key, t) in keys.

    Cumulative per-key sums at each distinct timestamp, looked up as of the two window edges
    with merge_asof: inclusive at the label-known edge, exclusive at the old edge.
    """
    per_ts = df.groupby([key, ts], sort=True)[LABEL].agg(n="count", pos="sum").reset_index()  # labelled rows
    per_ts["cum_n"] = per_ts.groupby(key, sort=False)["n"].cumsum()
    per_ts["cum_pos"] = per_ts.groupby(key, sort=False)["pos"].cumsum()
    known = _cumulative_as_of(keys, per_ts, key, ts, keys[ts] - delay, inclusive=True)
    old = _cumulative_as_of(keys, per_ts, key, ts, keys[ts] - window, inclusive=False)
    n = known["cum_n"] - old["cum_n"]
    pos = known["cum_pos"] - old["cum_pos"]
    return np.where(n > 0, pos / np.where(n > 0, n, 1), np.nan)


def _cumulative_as_of(keys, per_ts, key, ts, when: pd.Series, inclusive: bool) -> pd.DataFrame:
    """Cumulative (cum_n, cum_pos) of each key as of `when`, aligned to keys' rows."""
    left = pd.DataFrame({key: keys[key].array, "_at": when.array, "_row": np.arange(len(keys))})
    right = per_ts[[key, ts, "cum_n", "cum_pos"]].rename(columns={ts: "_at"})
    found = pd.merge_asof(left.sort_values("_at", kind="stable"), right.sort_values("_at", kind="stable"),
                          on="_at", by=key, direction="backward", allow_exact_matches=inclusive)
    found = found.sort_values("_row")
    return found[["cum_n", "cum_pos"]].fillna(0).reset_index(drop=True)


def _with_dtypes(df: pd.DataFrame, keys: list[str], aggs: list[Aggregate]) -> pd.DataFrame:
    df = df[keys + [a.feature_name for a in aggs]].copy()
    for agg in aggs:
        name = agg.feature_name
        df[name] = df[name].fillna(0).astype("int64") if agg.agg == "count" else df[name].astype("float64")
    return df
