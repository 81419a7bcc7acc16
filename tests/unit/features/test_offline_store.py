"""The fast offline store: the stock dask store's answers, by DuckDB's ASOF JOIN."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import feast
import numpy as np
import pandas as pd
from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.infra.offline_stores.dask import DaskOfflineStore
from feast.types import Float64, Int64

from sluicegate.features import catalog, definitions, retrieval
from sluicegate.features.offline_store import (
    FEAST_EVENT_TS,
    AsofFileOfflineStore,
    AsofFileOfflineStoreConfig,
    _asof_join,
)


def test_fast_offline_store_matches_feast_dask_store(built, frame, transactions, spec):
    settings, store, _ = built
    assert isinstance(store.config.offline_store, AsofFileOfflineStoreConfig)  # frame came from the fast store
    dask_store = feast.FeatureStore(config=definitions.repo_config(settings, spec, fast_retrieval=False))
    assert not isinstance(dask_store.config.offline_store, AsofFileOfflineStoreConfig)
    stock = retrieval.training_frame(dask_store, transactions, spec)
    pd.testing.assert_frame_equal(stock, frame)


def test_materialization_reads_each_keys_latest_row_as_the_dask_store_does(built, transactions, spec):
    """The fast store's latest rows per key in a window (what `feast materialize` writes online) are the
    stock dask store's, the window's edges included."""
    settings, store, _ = built
    view = store.get_feature_view(catalog.entity_view("customer"))
    when = transactions[spec.timestamp]
    windows = [(datetime(1970, 1, 2, tzinfo=UTC), when.max().to_pydatetime()),
               (when.quantile(0.4).to_pydatetime(), when.quantile(0.6).to_pydatetime())]
    config = definitions.repo_config(settings, spec, fast_retrieval=False)
    for start, end in windows:
        args = (view.batch_source, [spec.entities["customer"].key], [f.name for f in view.features],
                spec.timestamp, None, start, end)
        fast = AsofFileOfflineStore.pull_latest_from_table_or_query(store.config, *args).to_df()
        stock = DaskOfflineStore.pull_latest_from_table_or_query(config, *args).to_df()
        key = spec.entities["customer"].key
        assert 0 < len(fast) == len(stock)
        pd.testing.assert_frame_equal(fast.sort_values(key, ignore_index=True)[list(stock.columns)],
                                      stock.sort_values(key, ignore_index=True), check_dtype=False)


def test_as_of_join_is_pandas_merge_asof_within_the_ttl_in_the_entity_rows_order(tmp_path):
    """Latest feature row at or before each entity row, none older than the ttl; repeated and shuffled
    entity rows each get their own answer, in their order."""
    rng = np.random.default_rng(3)
    start = pd.Timestamp("2026-01-01", tz="UTC")
    table = pd.DataFrame({"account": rng.integers(0, 50, 4000),
                          "at": start + pd.to_timedelta(rng.integers(0, 5 * 3600, 4000), unit="s"),
                          "spend": rng.normal(size=4000), "visits": rng.integers(0, 9, 4000)})
    table = table.drop_duplicates(["account", "at"]).sort_values("at", ignore_index=True)
    table.to_parquet(tmp_path / "accounts.parquet")
    entity = Entity(name="account", join_keys=["account"], value_type=ValueType.INT64)
    view = FeatureView(name="accounts", entities=[entity], ttl=timedelta(hours=1),
                       schema=[Field(name="account", dtype=Int64), Field(name="spend", dtype=Float64),
                               Field(name="visits", dtype=Int64)],
                       source=FileSource(path=str(tmp_path / "accounts.parquet"), timestamp_field="at"))
    asked = pd.DataFrame({"account": rng.integers(0, 60, 3000),  # keys 50..59 have no rows at all
                          FEAST_EVENT_TS: start + pd.to_timedelta(rng.integers(0, 6 * 3600, 3000), unit="s")})
    asked = pd.concat([asked, asked.iloc[:300]], ignore_index=True)  # repeated pairs

    found = _asof_join(asked, view, ["spend", "visits"], tmp_path, AsofFileOfflineStoreConfig(),
                       full_feature_names=False)

    expected = pd.merge_asof(asked.reset_index().sort_values(FEAST_EVENT_TS), table, left_on=FEAST_EVENT_TS,
                             right_on="at", by="account", tolerance=pd.Timedelta(hours=1)).sort_values("index")
    assert 0 < found["spend"].isna().sum() < len(asked)  # some rows are past the ttl or have no key
    pd.testing.assert_frame_equal(found, expected[["spend", "visits"]].reset_index(drop=True))
