"""Point-in-time features from raw transactions, served through Feast.

Each feature row is keyed by (entity id, event timestamp) and holds what was
known just BEFORE that timestamp: only strictly earlier transactions count,
and a fraud label counts only once it is known, LABEL_DELAY after its
transaction. Because every transaction has a feature row at its own timestamp,
Feast's point-in-time join (feature ts <= event ts) picks exactly that row,
so a training row can never see itself or anything later.
"""

from __future__ import annotations

import hashlib
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, NamedTuple

import dask.dataframe as dd
import feast
import numpy as np
import pandas as pd
import pytz
from feast import Entity, FeatureService, FeatureView, Field, FileSource, Project, RepoConfig, ValueType
from feast.infra.offline_stores.dask import DaskOfflineStore, DaskOfflineStoreConfig, DaskRetrievalJob
from feast.infra.offline_stores.offline_store import RetrievalMetadata
from feast.infra.online_stores.redis import RedisOnlineStoreConfig
from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig
from feast.repo_config import RegistryConfig
from feast.types import Float64, Int64

from sluicegate.config import Settings
from sluicegate.features.catalog import (
    CUSTOMER_ENTITY,
    CUSTOMER_FEATURES,
    CUSTOMER_VIEW,
    FEATURE_NAMES,
    FEATURE_SERVICE,
    MERCHANT_ENTITY,
    MERCHANT_FEATURES,
    MERCHANT_VIEW,
    PROJECT,
)
from sluicegate.spec import DatasetSpec, load_spec

# Counts are never missing (no history is 0); the rest may be NaN.
COUNT_FEATURES = {"cust_txn_count_1h", "cust_txn_count_24h", "merch_txn_count_24h"}

LABEL_DELAY = pd.Timedelta(days=1)
FRAUD_RATE_WINDOW = pd.Timedelta(days=30)
# Longer than the longest window, so the PIT join never drops a row we wrote.
FEATURE_TTL = timedelta(days=31)
# Feast's dask store names the entity timestamp this way; other names make it guess.
FEAST_EVENT_TS = "event_timestamp"


# ---------------------------------------------------------------- transformation

def compute_feature_tables(
    transactions: pd.DataFrame, spec: DatasetSpec
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return (customer_df, merchant_df): one row per distinct (entity, timestamp)."""
    ts = spec.timestamp
    tx = transactions[[spec.entities.customer, spec.entities.merchant, ts, spec.amount, spec.label]].copy()
    tx[ts] = _utc(tx[ts])
    return _customer_table(tx, spec), _merchant_table(tx, spec)


def _utc(ts: pd.Series) -> pd.Series:
    # One unit everywhere: merge_asof refuses to match us against ns.
    return pd.to_datetime(ts, utc=True).dt.as_unit("ns")


def _sorted_by(df: pd.DataFrame, key: str, ts: str) -> pd.DataFrame:
    return df.sort_values([key, ts], kind="stable").reset_index(drop=True)


def _rolling_before(df: pd.DataFrame, key: str, ts: str, window: str, column: str):
    """Rolling window [t - window, t) per key; df must be sorted by (key, ts).

    closed="left" leaves out the row itself and every row sharing its timestamp.
    groupby(sort=True) emits groups in key order, which is df's order.
    """
    return df.groupby(key, sort=True).rolling(window, on=ts, closed="left")[column]


def _customer_table(tx: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    key, ts, amount = spec.entities.customer, spec.timestamp, spec.amount
    df, out = _per_entity(tx, key, ts, amount)
    out["cust_txn_count_1h"] = _count_before(df, key, ts, "1h")
    out["cust_txn_count_24h"] = _count_before(df, key, ts, "24h")
    week = _rolling_before(df, key, ts, "7D", amount)
    out["cust_amount_mean_7d"] = week.mean().to_numpy()
    out["cust_amount_std_7d"] = week.std().to_numpy()
    out = _one_row_per_timestamp(out, key, ts)
    previous = out.groupby(key, sort=False)[ts].shift(1)
    out["cust_minutes_since_prev"] = (out[ts] - previous).dt.total_seconds() / 60.0
    return _with_dtypes(out, [key, ts], CUSTOMER_FEATURES)


def _merchant_table(tx: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    key, ts, label = spec.entities.merchant, spec.timestamp, spec.label
    df, out = _per_entity(tx, key, ts, label)
    out["merch_txn_count_24h"] = _count_before(df, key, ts, "24h")
    out = _one_row_per_timestamp(out, key, ts)
    out["merch_fraud_rate_30d"] = _lagged_fraud_rate(df, out, key, ts, label)
    return _with_dtypes(out, [key, ts], MERCHANT_FEATURES)


def _per_entity(tx: pd.DataFrame, key: str, ts: str, value: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(df, out): tx's key, ts and value sorted by (key, ts) with a `_one` column to count,
    and a frame of df's (key, ts) rows to put features in."""
    df = _sorted_by(tx[[key, ts, value]], key, ts)
    df["_one"] = 1.0
    return df, df[[key, ts]].copy()


def _count_before(df: pd.DataFrame, key: str, ts: str, window: str) -> np.ndarray:
    """Transactions of the row's key in [t - window, t), aligned to df's rows."""
    return _rolling_before(df, key, ts, window, "_one").sum().to_numpy()


def _one_row_per_timestamp(out: pd.DataFrame, key: str, ts: str) -> pd.DataFrame:
    """Rows sharing (key, ts) have the same features: keep the first."""
    return out.drop_duplicates([key, ts], keep="first").reset_index(drop=True)


def _lagged_fraud_rate(df: pd.DataFrame, keys: pd.DataFrame, key: str, ts: str, label: str) -> np.ndarray:
    """Fraud rate over transactions with t - 30d <= ts <= t - LABEL_DELAY, per (key, t) in keys.

    Cumulative per-key sums at each distinct timestamp, looked up as of the two
    window edges with merge_asof: inclusive at the label-known edge, exclusive
    at the old edge.
    """
    per_ts = df.groupby([key, ts], sort=True)[label].agg(n="size", fraud="sum").reset_index()
    per_ts["cum_n"] = per_ts.groupby(key, sort=False)["n"].cumsum()
    per_ts["cum_fraud"] = per_ts.groupby(key, sort=False)["fraud"].cumsum()
    known = _cumulative_as_of(keys, per_ts, key, ts, keys[ts] - LABEL_DELAY, inclusive=True)
    old = _cumulative_as_of(keys, per_ts, key, ts, keys[ts] - FRAUD_RATE_WINDOW, inclusive=False)
    n = known["cum_n"] - old["cum_n"]
    fraud = known["cum_fraud"] - old["cum_fraud"]
    return np.where(n > 0, fraud / np.where(n > 0, n, 1), np.nan)


def _cumulative_as_of(keys, per_ts, key, ts, when: pd.Series, inclusive: bool) -> pd.DataFrame:
    """Cumulative (cum_n, cum_fraud) of each key as of `when`, aligned to keys' rows."""
    left = pd.DataFrame({key: keys[key].array, "_at": when.array, "_row": np.arange(len(keys))})
    right = per_ts[[key, ts, "cum_n", "cum_fraud"]].rename(columns={ts: "_at"})
    found = pd.merge_asof(left.sort_values("_at", kind="stable"), right.sort_values("_at", kind="stable"),
                          on="_at", by=key, direction="backward", allow_exact_matches=inclusive)
    found = found.sort_values("_row")
    return found[["cum_n", "cum_fraud"]].fillna(0).reset_index(drop=True)


def _with_dtypes(df: pd.DataFrame, keys: list[str], features: list[str]) -> pd.DataFrame:
    df = df[keys + features].copy()
    for name in features:
        if name in COUNT_FEATURES:
            df[name] = df[name].fillna(0).astype("int64")
        else:
            df[name] = df[name].astype("float64")
    return df


# ---------------------------------------------------------------- offline tables

def feature_table_paths(features_dir: Path) -> dict[str, Path]:
    """Parquet file of each feature view, the FileSource Feast reads."""
    return {view: features_dir / f"{view}.parquet" for view in (CUSTOMER_VIEW, MERCHANT_VIEW)}


def write_feature_tables(customer_df: pd.DataFrame, merchant_df: pd.DataFrame, features_dir: Path) -> None:
    """Write both tables, merged with rows already there; new rows win on (entity, timestamp)."""
    paths = feature_table_paths(features_dir)
    features_dir.mkdir(parents=True, exist_ok=True)
    _merge_and_replace(customer_df, paths[CUSTOMER_VIEW])
    _merge_and_replace(merchant_df, paths[MERCHANT_VIEW])


def _merge_and_replace(new: pd.DataFrame, path: Path) -> None:
    keys = [c for c in new.columns if c not in FEATURE_NAMES]
    table = new
    if path.exists():
        table = pd.concat([pd.read_parquet(path), new], ignore_index=True)
    table = table.drop_duplicates(keys, keep="last").sort_values(keys[::-1], kind="stable")
    # Write aside and rename, so a reader (or a crash) never sees half a table.
    tmp = path.with_suffix(".parquet.tmp")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, path)


# ---------------------------------------------------------------- Feast objects

class FeastDefinitions(NamedTuple):
    project: Project
    customer: Entity
    merchant: Entity
    customer_source: FileSource
    merchant_source: FileSource
    customer_view: FeatureView
    merchant_view: FeatureView
    service: FeatureService


def build_definitions(spec: DatasetSpec, features_dir: Path) -> FeastDefinitions:
    """The Feast objects; both apply_definitions and feature_repo/definitions.py use these."""
    paths = feature_table_paths(features_dir)
    cust_key, merch_key = spec.entities.customer, spec.entities.merchant
    customer = Entity(name=CUSTOMER_ENTITY, join_keys=[cust_key], value_type=ValueType.INT64)
    merchant = Entity(name=MERCHANT_ENTITY, join_keys=[merch_key], value_type=ValueType.INT64)
    customer_source = FileSource(name=f"{CUSTOMER_VIEW}_source", path=str(paths[CUSTOMER_VIEW]),
                                 timestamp_field=spec.timestamp)
    merchant_source = FileSource(name=f"{MERCHANT_VIEW}_source", path=str(paths[MERCHANT_VIEW]),
                                 timestamp_field=spec.timestamp)
    customer_view = FeatureView(name=CUSTOMER_VIEW, entities=[customer], ttl=FEATURE_TTL, online=True,
                                schema=[Field(name=cust_key, dtype=Int64), *_fields(CUSTOMER_FEATURES)],
                                source=customer_source)
    merchant_view = FeatureView(name=MERCHANT_VIEW, entities=[merchant], ttl=FEATURE_TTL, online=True,
                                schema=[Field(name=merch_key, dtype=Int64), *_fields(MERCHANT_FEATURES)],
                                source=merchant_source)
    service = FeatureService(name=FEATURE_SERVICE, features=[customer_view, merchant_view])
    return FeastDefinitions(Project(name=PROJECT), customer, merchant, customer_source, merchant_source,
                            customer_view, merchant_view, service)


def _fields(names: list[str]) -> list[Field]:
    return [Field(name=n, dtype=Int64 if n in COUNT_FEATURES else Float64) for n in names]


def feature_store(settings: Settings) -> feast.FeatureStore:
    """A FeatureStore configured in code from settings, independent of the working directory."""
    return feast.FeatureStore(config=repo_config(settings))


def repo_config(settings: Settings, fast_retrieval: bool = True) -> RepoConfig:
    """Registry and online store under SLUICEGATE_HOME (or Redis); file offline store.

    fast_retrieval=False uses Feast's stock dask store: same answers, O(rows per key squared).
    """
    paths = settings.paths
    paths.feast.mkdir(parents=True, exist_ok=True)
    if settings.feast_redis:
        online = RedisOnlineStoreConfig(connection_string=settings.feast_redis)
    else:
        online = SqliteOnlineStoreConfig(path=str(paths.feast / "online.db"))
    return RepoConfig(
        project=PROJECT,
        provider="local",
        registry=RegistryConfig(registry_type="file", path=str(paths.feast / "registry.db")),
        online_store=online,
        offline_store=AsofFileOfflineStoreConfig() if fast_retrieval else DaskOfflineStoreConfig(),
        # 3 is the current scheme; lower versions raise deprecation warnings.
        entity_key_serialization_version=3,
        repo_path=paths.feast,
    )


def apply_definitions(store: feast.FeatureStore, settings: Settings) -> None:
    """Register entities, sources, views and the service; re-applying changes nothing."""
    definitions = build_definitions(load_spec(settings.spec_path), settings.paths.features)
    store.apply(list(definitions))


def materialize(store: feast.FeatureStore, end: datetime) -> None:
    """Load the latest feature rows up to `end` into the online store.

    A view never materialized starts at its first row: materialize_incremental
    would start at now - ttl, which skips data older than that.
    """
    end = _aware(end)
    fresh = [v.name for v in store.list_feature_views() if v.most_recent_end_time is None]
    if fresh:
        store.materialize(start_date=datetime(1970, 1, 2, tzinfo=UTC), end_date=end, feature_views=fresh)
    store.materialize_incremental(end_date=end)


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo else when.replace(tzinfo=UTC)


# ---------------------------------------------------------------- offline store

ASOF_STORE_TYPE = "sluicegate.features.store.AsofFileOfflineStore"


class AsofFileOfflineStoreConfig(DaskOfflineStoreConfig):
    """Selects AsofFileOfflineStore; Feast finds the class by dropping "Config"."""

    type: Literal["sluicegate.features.store.AsofFileOfflineStore"] = ASOF_STORE_TYPE  # type: ignore[assignment]


class AsofFileOfflineStore(DaskOfflineStore):
    """Feast's file (dask) offline store with a merge_asof point-in-time join.

    The dask store merges every entity row with every feature row of the same
    key before filtering, O(rows per key squared): 40M rows and ~50 s for
    200k transactions over 1,000 merchants. merge_asof gives the same answer
    (latest feature row with event ts - ttl <= ts <= event ts) in O(n log n).
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
            result[FEAST_EVENT_TS] = _utc(result[FEAST_EVENT_TS])
            for view, features in by_view:
                found = _asof_join(result, view, features, config.repo_path, full_feature_names)
                for column in found.columns:
                    result[column] = found[column].to_numpy()
            return dd.from_pandas(result, npartitions=1)

        when = _utc(entity_df[FEAST_EVENT_TS])
        keys = [c for c in entity_df if c != FEAST_EVENT_TS]
        metadata = RetrievalMetadata(features=feature_refs, keys=keys,
                                     min_event_timestamp=when.min(), max_event_timestamp=when.max())
        return DaskRetrievalJob(evaluation_function=evaluate, full_feature_names=full_feature_names,
                                repo_path=str(config.repo_path), metadata=metadata)


def _features_by_view(feature_views, feature_refs) -> list[tuple[FeatureView, list[str]]] | None:
    """(view, feature names) per requested view, or None when the fast join does not apply."""
    wanted: dict[str, list[str]] = {}
    for ref in feature_refs:
        view_name, feature = ref.split(":", 1)
        wanted.setdefault(view_name, []).append(feature)
    pairs = []
    for view in feature_views:
        source = view.batch_source
        simple = (isinstance(source, FileSource) and not source.field_mapping
                  and not source.created_timestamp_column and not view.projection.join_key_map)
        if not simple:
            return None
        pairs.append((view, wanted.pop(view.projection.name_to_use(), [])))
    # Anything left is an on-demand view or unknown: the dask store handles it.
    return None if wanted else pairs


def _asof_join(entity_df: pd.DataFrame, view: FeatureView, features: list[str], repo_path,
               full_feature_names: bool) -> pd.DataFrame:
    """The view's features for each entity row (same order), latest row at or before its timestamp."""
    keys = [column.name for column in view.entity_columns]
    source = view.batch_source
    path = FileSource.get_uri_for_file_path(repo_path=repo_path, uri=source.file_options.uri)
    table = pd.read_parquet(path, columns=[*keys, source.timestamp_field, *features])
    table = table.rename(columns={source.timestamp_field: "_feature_ts"})
    table["_feature_ts"] = _utc(table["_feature_ts"])
    left = entity_df[[*keys, FEAST_EVENT_TS]].assign(_row=np.arange(len(entity_df)))
    joined = pd.merge_asof(
        left.sort_values(FEAST_EVENT_TS, kind="stable"), table.sort_values("_feature_ts", kind="stable"),
        left_on=FEAST_EVENT_TS, right_on="_feature_ts", by=keys, direction="backward",
        allow_exact_matches=True, tolerance=pd.Timedelta(view.ttl) if view.ttl else None,
    ).sort_values("_row")
    found = joined[features].reset_index(drop=True)
    if full_feature_names:
        found.columns = [f"{view.projection.name_to_use()}__{f}" for f in features]
    return found


# ---------------------------------------------------------------- retrieval

def training_frame(store: feast.FeatureStore, transactions: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """The transactions, in order, with FEATURE_NAMES as of each transaction's timestamp.

    Each view is fetched with an entity frame of its distinct (key, timestamp)
    pairs, then joined back: Feast's stock dask store keeps one row per (join
    keys seen so far, timestamp), so two transactions of one customer in the
    same second at different merchants would lose a row; fewer rows also join faster.
    """
    out = transactions.copy()
    # Feast re-parses any timestamp whose tz is not pytz's UTC object, row by row.
    when = _utc(out[spec.timestamp]).dt.tz_convert(pytz.UTC)
    service = store.get_feature_service(FEATURE_SERVICE)
    for projection in service.feature_view_projections:
        view = store.get_feature_view(projection.name)
        key = view.entity_columns[0].name
        refs = [f"{projection.name_to_use()}:{f.name}" for f in projection.features]
        lookup = pd.DataFrame({key: out[key].array, FEAST_EVENT_TS: when.array})
        entity_df = lookup.drop_duplicates(ignore_index=True)
        found = store.get_historical_features(entity_df=entity_df, features=refs).to_df()
        found = found[[key, FEAST_EVENT_TS, *(f.name for f in projection.features)]]
        joined = lookup.merge(found, on=[key, FEAST_EVENT_TS], how="left", validate="many_to_one")
        for feature in projection.features:
            out[feature.name] = joined[feature.name].to_numpy()
    return out


def online_features(
    store: feast.FeatureStore, customer_ids: list[int], merchant_ids: list[int]
) -> pd.DataFrame:
    """Latest feature values for (customer, merchant) pairs, via the feature service."""
    if len(customer_ids) != len(merchant_ids):
        raise ValueError(f"need one merchant per customer, got {len(customer_ids)} and {len(merchant_ids)}")
    cust_key = store.get_entity(CUSTOMER_ENTITY).join_key
    merch_key = store.get_entity(MERCHANT_ENTITY).join_key
    rows = {cust_key: [int(c) for c in customer_ids], merch_key: [int(m) for m in merchant_ids]}
    service = store.get_feature_service(FEATURE_SERVICE)
    return store.get_online_features(features=service, entity_rows=rows).to_df()


# ---------------------------------------------------------------- lineage

def frame_hash(df: pd.DataFrame) -> str:
    """sha256 of a frame's columns, dtypes and values in row order (the index is ignored)."""
    digest = hashlib.sha256()
    for name, dtype in df.dtypes.items():
        digest.update(f"{name}\x1f{dtype}\x1e".encode())
    digest.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return digest.hexdigest()
