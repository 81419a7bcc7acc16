"""Feast's file offline store with DuckDB's ASOF JOIN as its point-in-time join."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from feast import FeatureView, FileSource
from feast.infra.offline_stores.dask import DaskOfflineStore, DaskOfflineStoreConfig, DaskRetrievalJob
from feast.infra.offline_stores.offline_store import RetrievalMetadata
from feast.infra.offline_stores.offline_utils import DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL

from sluicegate.features.aggregates import as_utc

# Feast's dask store names the entity timestamp this way; other names make it guess.
FEAST_EVENT_TS = DEFAULT_ENTITY_DF_EVENT_TIMESTAMP_COL


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)



ASOF_STORE_TYPE = "sluicegate.features.offline_store.AsofFileOfflineStore"


class AsofFileOfflineStoreConfig(DaskOfflineStoreConfig):
    """Selects AsofFileOfflineStore; Feast finds the class by dropping "Config"."""

    type: Literal["sluicegate.features.offline_store.AsofFileOfflineStore"] = ASOF_STORE_TYPE  # type: ignore[assignment]
    # DuckDB's memory for one join, past which it spills to `temp_directory`; None: DuckDB's defaults
    # (80% of the machine's memory; `.tmp` in the working directory). `repo_config` sets both from Settings.
    memory_limit: str | None = None
    temp_directory: str | None = None

    def duckdb_config(self) -> dict[str, str]:
        return {k: v for k, v in (("memory_limit", self.memory_limit), ("temp_directory", self.temp_directory)) if v}


class AsofFileOfflineStore(DaskOfflineStore):
    """Feast's file (dask) offline store with an as-of point-in-time join (DuckDB's ASOF JOIN).

    The dask store merges every entity row with every feature row of the same
    key before filtering, O(rows per key squared): 40M rows and ~50 s for
    200k transactions over 1,000 merchants. The as-of join gives the same answer
    (latest feature row with event ts - ttl <= ts <= event ts) in O(n log n),
    one row per entity row in the entity frame's order, repeated pairs included.
    Materialization and anything beyond plain file-sourced feature views are
    left to the dask store.
    """

    @staticmethod
    def get_historical_features(config, feature_views, feature_refs, entity_df, registry, project,
                                full_feature_names=False, filter_by_created_timestamp=False, **kwargs):
        by_view = _features_by_view(feature_views, feature_refs)
        if by_view is None or not isinstance(entity_df, pd.DataFrame) or FEAST_EVENT_TS not in entity_df:
            return DaskOfflineStore.get_historical_features(
                config, feature_views, feature_refs, entity_df, registry, project,
                full_feature_names, filter_by_created_timestamp, **kwargs)

        def evaluate():
            result = entity_df.copy()
            result[FEAST_EVENT_TS] = as_utc(result[FEAST_EVENT_TS])
            for view, features in by_view:
                found = _asof_join(result, view, features, config.repo_path, config.offline_store,
                                   full_feature_names)
                for column in found.columns:  # by position; .array keeps pyarrow strings (no objects)
                    result[column] = found[column].array
            return result

        when = as_utc(entity_df[FEAST_EVENT_TS])
        keys = [c for c in entity_df if c != FEAST_EVENT_TS]
        metadata = RetrievalMetadata(features=feature_refs, keys=keys,
                                     min_event_timestamp=when.min(), max_event_timestamp=when.max())
        return AsofRetrievalJob(evaluation_function=evaluate, full_feature_names=full_feature_names,
                                repo_path=str(config.repo_path), metadata=metadata)

    @staticmethod
    def pull_latest_from_table_or_query(config, data_source, join_key_columns, feature_name_columns,
                                        timestamp_field, created_timestamp_column, start_date=None, end_date=None):
        """Each key's latest row in [start_date, end_date], for materialization: the dask store's answer.

        The dask store reads the whole file and sorts it on Dask (a minute at 10M rows) to keep a few
        rows per key; here only the row groups that can hold the window are read (parquet statistics),
        and sorting them is cheap: the files are written in time order (`write_feature_tables`)."""
        if not (join_key_columns and _plain_file(data_source)):
            return DaskOfflineStore.pull_latest_from_table_or_query(
                config, data_source, join_key_columns, feature_name_columns, timestamp_field,
                created_timestamp_column, start_date, end_date)
        path = FileSource.get_uri_for_file_path(repo_path=config.repo_path, uri=data_source.file_options.uri)

        def evaluate():
            return _latest_rows(path, join_key_columns, feature_name_columns, timestamp_field, start_date, end_date)

        return AsofRetrievalJob(evaluation_function=evaluate, full_feature_names=False, repo_path=str(config.repo_path))


class AsofRetrievalJob(DaskRetrievalJob):
    """The fast store's job (a join, or materialization's latest rows): its evaluation gives the pandas
    frame itself.

    Feast's `to_df` goes through an Arrow table and back (`to_arrow().to_pandas()`), about 1.5 s per
    million rows here for a frame that already is pandas; with no on-demand view or validation to
    apply, `to_df` returns the frame. `to_arrow` and everything else behave as Feast's.
    """

    def _to_df_internal(self, timeout: int | None = None) -> pd.DataFrame:
        frame = self.evaluation_function()
        frame.index = pd.RangeIndex(len(frame))  # reset_index would copy every column
        return frame

    def _to_arrow_internal(self, timeout: int | None = None):
        import pyarrow

        return pyarrow.Table.from_pandas(self.evaluation_function())

    def to_df(self, validation_reference=None, timeout: int | None = None) -> pd.DataFrame:
        if validation_reference is not None or self.on_demand_feature_views:
            return super().to_df(validation_reference=validation_reference, timeout=timeout)
        return self._to_df_internal(timeout)


def _latest_rows(path, keys: list[str], features: list[str], timestamp: str, start: datetime | None,
                 end: datetime | None) -> pd.DataFrame:
    """Each key's latest row with start <= timestamp <= end (both inclusive, as the dask store's)."""
    window = [(timestamp, op, pd.Timestamp(_aware(when))) for op, when in ((">=", start), ("<=", end)) if when]
    with pd.option_context("mode.string_storage", "pyarrow"):
        rows = pd.read_parquet(path, columns=list(dict.fromkeys([*keys, *features, timestamp])),
                               filters=window or None)
    latest = rows.sort_values(timestamp, kind="stable").drop_duplicates(keys, keep="last")
    return latest.reset_index(drop=True)


def _plain_file(source) -> bool:
    """A parquet file read as it is, what the fast store's own readers handle: no renamed columns, no
    created timestamps, no S3 endpoint of its own (the dask store handles those)."""
    return (isinstance(source, FileSource) and not source.field_mapping and not source.created_timestamp_column
            and not source.file_options.s3_endpoint_override)


def _features_by_view(feature_views, feature_refs) -> list[tuple[FeatureView, list[str]]] | None:
    """(view, feature names) per requested view, or None when the fast join does not apply."""
    wanted: dict[str, list[str]] = {}
    for ref in feature_refs:
        view_name, feature = ref.split(":", 1)
        wanted.setdefault(view_name, []).append(feature)
    pairs = []
    for view in feature_views:
        if not _plain_file(view.batch_source) or view.projection.join_key_map:
            return None
        pairs.append((view, wanted.pop(view.projection.name_to_use(), [])))
    # Anything left is an on-demand view or unknown: the dask store handles it.
    return None if wanted else pairs


def _asof_join(entity_df: pd.DataFrame, view: FeatureView, features: list[str], repo_path,
               offline: AsofFileOfflineStoreConfig, full_feature_names: bool) -> pd.DataFrame:
    """The view's features for each entity row (same order): its latest row at or before the row's
    timestamp, and no older than the view's ttl.

    DuckDB's ASOF JOIN does it (equal keys, latest feature timestamp <= the row's), reading the view's
    file itself (only the columns asked for, streamed) and the entity rows as Arrow without copies, within
    the store's `memory_limit`. Measured at 10M entity rows against 10.2M feature rows: 6.5 s, against
    22.1 s for pandas' merge_asof in key shards of integer codes; reading the file in DuckDB rather than
    handing it an Arrow table took the row view's join from 10.5 s to 7.1 s and 5.7 GB to 4.4 GB."""
    keys = [column.name for column in view.entity_columns]
    source = view.batch_source
    path = FileSource.get_uri_for_file_path(repo_path=repo_path, uri=source.file_options.uri)
    # Timestamps as int64 nanoseconds on both sides: DuckDB's own timestamps stop at microseconds.
    rows = pa.table({**{k: pa.array(entity_df[k]) for k in keys},
                     "__ts": entity_df[FEAST_EVENT_TS].array.asi8, "__row": np.arange(len(entity_df))})
    columns = ", ".join(f'"{c}"' for c in [*keys, *features])
    feature_rows = f"SELECT {columns}, epoch_ns(\"{source.timestamp_field}\") AS __ts FROM read_parquet($path)"
    on = " AND ".join(f'e."{k}" = f."{k}"' for k in keys)
    oldest = f'f.__ts >= e.__ts - {pd.Timedelta(view.ttl).value}' if view.ttl else "TRUE"
    picked = ", ".join(f'CASE WHEN {oldest} THEN f."{c}" END AS "{c}"' for c in features)
    with duckdb.connect(config=offline.duckdb_config()) as con:
        con.register("entity_rows", rows)
        joined = con.execute(f"SELECT {picked} FROM entity_rows e ASOF LEFT JOIN ({feature_rows}) f "
                             f"ON {on} AND e.__ts >= f.__ts ORDER BY e.__row", {"path": str(path)}).to_arrow_table()
    # The file's pandas metadata gives each column back the dtype it was written with; pandas strings as
    # pyarrow strings, not Python objects. self_destruct frees each Arrow column once it is converted.
    with pd.option_context("mode.string_storage", "pyarrow"):
        found = joined.replace_schema_metadata(pq.read_schema(path).metadata).to_pandas(self_destruct=True)
    if full_feature_names:
        found.columns = [f"{view.projection.name_to_use()}__{f}" for f in features]
    return found
