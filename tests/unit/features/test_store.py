"""Feature engineering and the Feast round trip: point-in-time correctness first."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import feast
import numpy as np
import pandas as pd
import pytest
from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.infra.offline_stores.dask import DaskOfflineStore
from feast.types import Float64, Int64

from sluicegate.config import Settings, ensure_home
from sluicegate.data.synthetic import GenerateConfig, generate_transactions
from sluicegate.features import catalog
from sluicegate.features import store as F
from sluicegate.spec import load_spec

SAMPLE_ROWS = 300


@pytest.fixture(scope="module")
def spec():
    return load_spec()


@pytest.fixture(scope="module")
def transactions(spec):
    return generate_transactions(GenerateConfig(rows=20000, days=10, seed=3), spec)


def build(transactions: pd.DataFrame, spec, home) -> tuple[Settings, feast.FeatureStore, dict]:
    """Transform, write and apply into a fresh home."""
    settings = Settings(home=home)
    ensure_home(settings.paths)
    tables = F.feature_tables(transactions, spec)
    F.write_feature_tables(tables, settings.paths.features, spec)
    store = F.feature_store(settings, spec)
    F.apply_definitions(store, spec, settings)
    return settings, store, tables


@pytest.fixture(scope="module")
def built(transactions, spec, tmp_path_factory):
    return build(transactions, spec, tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def frame(built, transactions, spec):
    _, store, _ = built
    return F.training_frame(store, transactions, spec)


def brute_force(rows: pd.DataFrame, spec, row: pd.Series) -> dict:
    """Every aggregate of the spec recomputed from the raw rows strictly before the row, one at a time."""
    at, ts = row[spec.timestamp], rows[spec.timestamp]
    out = {}
    for agg in spec.features.aggregates:
        key = spec.entities[agg.entity].key
        past = rows[(rows[key] == row[key]) & (ts < at)]
        past_ts = past[spec.timestamp]
        window = pd.Timedelta(agg.window) if agg.window else None
        inside = past[past_ts >= at - window] if window is not None else past
        if agg.agg == "count":
            value = len(inside)
        elif agg.agg == "time_since_previous":
            value = (at - past_ts.max()).total_seconds() if len(past) else np.nan
        elif agg.agg == "label_rate":  # a label is known only label_delay after its event
            known = past[(past_ts + spec.label_delay <= at) & (past_ts >= at - window)]
            value = spec.positive(known[spec.label]).mean() if len(known) else np.nan
        else:
            values = inside[agg.column]
            value = getattr(values, agg.agg)() if len(values) > (1 if agg.agg == "std" else 0) else np.nan
        out[agg.feature_name] = value
    return out


def test_training_features_equal_brute_force_past_only(frame, transactions, spec):
    rng = np.random.default_rng(0)
    for i in rng.choice(len(transactions), size=SAMPLE_ROWS, replace=False):
        expected = brute_force(transactions, spec, transactions.iloc[i])
        for name, value in expected.items():
            np.testing.assert_allclose(frame.iloc[i][name], value, rtol=1e-9, atol=1e-9, equal_nan=True,
                                       err_msg=f"row {i} {name}")


def test_future_transactions_do_not_leak(frame, transactions, spec, tmp_path):
    cust_key, merch_key, ts = spec.entities["customer"].key, spec.entities["merchant"].key, spec.timestamp
    busiest = transactions[cust_key].value_counts().index[0]
    mine = transactions.index[transactions[cust_key] == busiest]
    event = mine[len(mine) // 2]
    at = transactions.loc[event, ts]
    next_event = mine[transactions.loc[mine, ts] > at][0]
    # A huge fraud just after the event; a fraud just before it whose label is not yet known.
    future = transactions.loc[[event]].assign(**{ts: at + pd.Timedelta("1s"), "amount": 49_999.0,
                                                 spec.label: 1, spec.id: "planted-future"})
    unlabelled = transactions.loc[[event]].assign(**{ts: at - pd.Timedelta("12h"), spec.label: 1,
                                                     spec.id: "planted-unlabelled", cust_key: -1})
    planted = pd.concat([transactions, future, unlabelled], ignore_index=True)
    planted = planted.sort_values(ts, kind="stable", ignore_index=True)
    _, store, _ = build(planted, spec, tmp_path)
    after = F.training_frame(store, transactions, spec)

    unchanged = [n for n in [a.feature_name for a in spec.features.aggregates] if n != "merch_txn_count_24h"]
    pd.testing.assert_series_equal(after.loc[event, unchanged], frame.loc[event, unchanged])
    # The unlabelled fraud is a past transaction, so it counts; its label does not, yet.
    assert after.loc[event, "merch_txn_count_24h"] == frame.loc[event, "merch_txn_count_24h"] + 1
    # Not vacuous: the planted rows are visible where they should be.
    assert after.loc[next_event, "cust_amount_mean_7d"] > frame.loc[next_event, "cust_amount_mean_7d"]
    merchant = transactions.loc[event, merch_key]
    later = transactions.index[(transactions[merch_key] == merchant) & (transactions[ts] > at)]
    assert (after.loc[later, "merch_fraud_rate_30d"] != frame.loc[later, "merch_fraud_rate_30d"]).any()


def test_training_frame_one_row_per_transaction_in_order(built, frame, transactions, spec):
    assert list(frame.columns) == list(transactions.columns) + [a.feature_name for a in spec.features.aggregates]
    pd.testing.assert_frame_equal(frame[transactions.columns], transactions)
    for agg in spec.features.aggregates:
        assert frame[agg.feature_name].dtype == ("int64" if agg.agg == "count" else "float64"), agg.feature_name

    # Shuffled, with exact duplicate rows: still one output row per input row, in input order.
    _, store, _ = built
    rng = np.random.default_rng(1)
    messy = pd.concat([transactions, transactions.iloc[:500]]).iloc[rng.permutation(len(transactions) + 500)]
    messy_frame = F.training_frame(store, messy, spec)
    assert len(messy_frame) == len(messy)
    assert messy_frame[spec.id].tolist() == messy[spec.id].tolist()
    names = [a.feature_name for a in spec.features.aggregates]
    expected = frame.set_index(spec.id).loc[messy[spec.id], names].reset_index(drop=True)
    pd.testing.assert_frame_equal(messy_frame[names].reset_index(drop=True), expected)


def test_fast_offline_store_matches_feast_dask_store(built, frame, transactions, spec):
    settings, _, _ = built
    dask_store = feast.FeatureStore(config=F.repo_config(settings, spec, fast_retrieval=False))
    stock = F.training_frame(dask_store, transactions, spec)
    pd.testing.assert_frame_equal(stock, frame)


def test_materialization_reads_each_keys_latest_row_as_the_dask_store_does(built, transactions, spec):
    """The fast store's latest rows per key in a window (what materialization writes online) are the
    stock dask store's, the window's edges included."""
    settings, store, _ = built
    view = store.get_feature_view(catalog.entity_view("customer"))
    when = transactions[spec.timestamp]
    windows = [(datetime(1970, 1, 2, tzinfo=UTC), when.max().to_pydatetime()),
               (when.quantile(0.4).to_pydatetime(), when.quantile(0.6).to_pydatetime())]
    config = F.repo_config(settings, spec, fast_retrieval=False)
    for start, end in windows:
        args = (view.batch_source, [spec.entities["customer"].key], [f.name for f in view.features],
                spec.timestamp, None, start, end)
        fast = F.AsofFileOfflineStore.pull_latest_from_table_or_query(store.config, *args).to_df()
        stock = DaskOfflineStore.pull_latest_from_table_or_query(config, *args).to_df()
        key = spec.entities["customer"].key
        assert 0 < len(fast) == len(stock)
        pd.testing.assert_frame_equal(fast.sort_values(key, ignore_index=True)[list(stock.columns)],
                                      stock.sort_values(key, ignore_index=True), check_dtype=False)


def test_apply_is_idempotent_and_online_serves_latest(built, transactions, spec):
    settings, store, tables = built

    def registered():
        return (sorted(e.name for e in store.list_entities()),
                sorted((v.name, tuple(f.name for f in v.features)) for v in store.list_feature_views()),
                [s.name for s in store.list_feature_services()])

    before = registered()
    F.apply_definitions(store, spec, settings)
    F.apply_definitions(store, spec, settings)
    assert registered() == before
    assert before[2] == [catalog.feature_service(spec)] == [spec.name]
    assert before[0] == ["customer", "merchant", "row"]

    F.materialize(store, transactions[spec.timestamp].max().to_pydatetime() + pd.Timedelta("1s"))
    keys = {e: spec.entities[e].key for e in ("customer", "merchant")}
    busiest = {e: int(transactions[k].value_counts().index[0]) for e, k in keys.items()}
    online = F.online_features(store, spec, {k: [busiest[e]] for e, k in keys.items()})
    for entity, key in keys.items():
        table = tables[catalog.entity_view(entity)]
        latest = table[table[key] == busiest[entity]].iloc[-1]
        for name in catalog.entity_features(spec, entity):
            np.testing.assert_allclose(online[name][0], latest[name], rtol=1e-12, equal_nan=True, err_msg=name)

    # Re-applying keeps the materialization watermark: the next run is incremental.
    F.apply_definitions(store, spec, settings)
    assert all(v.most_recent_end_time is not None for v in store.list_feature_views() if v.online)


def test_write_feature_tables_adds_later_batches_and_never_rewrites_a_row(built, spec, tmp_path):
    _, _, tables = built
    for name, table in tables.items():  # what writing relies on: one row per (key, timestamp) in each table
        assert not table.duplicated(list(table.columns[:2])).any(), name
    view = catalog.entity_view("customer")
    customer_df = tables[view]
    half = len(customer_df) // 2
    F.write_feature_tables({view: customer_df.iloc[:half]}, tmp_path, spec)
    changed = customer_df.iloc[half - 10:].assign(cust_txn_count_1h=999)
    F.write_feature_tables({view: changed}, tmp_path, spec)
    stored = pd.read_parquet(F.feature_table_paths(tmp_path, spec)[view])
    assert len(stored) == len(customer_df)
    assert (stored["cust_txn_count_1h"] == 999).sum() == len(changed) - 10  # the 10 already there stay


def test_frame_hash_is_stable_and_content_sensitive(transactions):
    df = transactions.head(1000)
    digest = F.frame_hash(df)
    assert digest == F.frame_hash(df.copy()) == F.frame_hash(df.reset_index(drop=True))
    assert len(digest) == 64
    tweaked = df.copy()
    tweaked.iloc[500, tweaked.columns.get_loc("amount")] += 0.01
    assert F.frame_hash(tweaked) != digest
    assert F.frame_hash(df.rename(columns={"amount": "amount_usd"})) != digest
    assert F.frame_hash(df.iloc[::-1]) != digest


def test_frame_hash_in_slices_is_the_whole_frames_hash(transactions, monkeypatch):
    """frame_hash hashes a slice of rows at a time; the slicing must not change the digest."""
    df = transactions.head(1000).astype({"channel": "string[pyarrow]"})
    whole = F.frame_hash(df)
    monkeypatch.setattr(F, "HASH_ROWS", 7)
    assert F.frame_hash(df) == whole
    reference = hashlib.sha256()
    for name, dtype in df.dtypes.items():
        reference.update(f"{name}\x1f{dtype}\x1e".encode())
    reference.update(pd.util.hash_pandas_object(df.astype({"channel": object}), index=False).to_numpy().tobytes())
    assert whole == reference.hexdigest()  # pandas' own row hashes, all rows at once


OTHER_TABLE = {
    "spec_version": 1, "name": "claims",
    "table": {"id": "claim_id", "timestamp": "filed_at", "label": "fraudulent", "positive": "Yes",
              "label_delay": "2d"},
    "columns": {"claim_id": {"dtype": "string"}, "filed_at": {"dtype": "timestamp"},
                "policy": {"dtype": "string"}, "amount": {"dtype": "float64"},
                "fraudulent": {"dtype": "string", "categories": ["Yes", "No"]}},
    "entities": {"policy": {"key": "policy"}},
    "features": {"numeric": ["amount"], "aggregates": [
        {"entity": "policy", "agg": agg, "column": "amount", "window": "5d"} for agg in ("sum", "min", "max", "mean")
    ] + [{"entity": "policy", "agg": "count", "window": "12h"}, {"entity": "policy", "agg": "time_since_previous"},
         {"entity": "policy", "agg": "label_rate", "window": "20d"}]},
}


def test_any_spec_string_keys_and_every_aggregation_are_point_in_time_correct(tmp_path):
    from sluicegate.spec import parse_spec

    spec = parse_spec(OTHER_TABLE)
    rng = np.random.default_rng(5)
    n = 3000
    rows = pd.DataFrame({
        "claim_id": [f"c{i}" for i in range(n)],
        "filed_at": pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.sort(rng.uniform(0, 40 * 86400, n)),
                                                                          unit="s").floor("s"),
        "policy": rng.choice([f"P-{i}" for i in range(60)], n),
        "amount": rng.gamma(2.0, 500.0, n),
        "fraudulent": rng.choice(["Yes", "No"], n, p=[0.1, 0.9]),
    })
    settings, store, _ = build(rows, spec, tmp_path)
    frame = F.training_frame(store, rows, spec)
    assert sorted(e.name for e in store.list_entities()) == ["policy", "row"]
    assert store.get_entity("policy").value_type == feast.ValueType.STRING
    # The row view serves the row's own model columns, keyed by its id, offline only.
    row_view = store.get_feature_view("row_features")
    assert store.get_entity("row").join_key == "claim_id" and not row_view.online
    assert [f.name for f in row_view.features] == ["amount"]
    np.testing.assert_array_equal(frame["amount"].to_numpy(), rows["amount"].to_numpy())
    assert list(frame.columns[:len(rows.columns)]) == list(rows.columns)
    for i in rng.choice(n, size=150, replace=False):
        for name, value in brute_force(rows, spec, rows.iloc[i]).items():
            np.testing.assert_allclose(frame.iloc[i][name], value, rtol=1e-9, atol=1e-9, equal_nan=True,
                                       err_msg=f"row {i} {name}")


def _claims(n: int, start: str, days: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "claim_id": [f"{start}-c{i}" for i in range(n)],
        "filed_at": pd.Timestamp(start, tz="UTC") + pd.to_timedelta(np.sort(rng.uniform(0, days * 86400, n)),
                                                                    unit="s").floor("s"),
        "policy": rng.choice([f"P-{i}" for i in range(40)], n),
        "amount": rng.gamma(2.0, 500.0, n),
        "fraudulent": rng.choice(["Yes", "No"], n, p=[0.1, 0.9]),
    }).sort_values("filed_at", ignore_index=True)


def test_a_second_batch_sees_the_first_batchs_history_and_the_online_row_its_last_event(tmp_path):
    """A policy active only at the end of batch one and once at the start of batch two: its batch-two
    row counts the batch-one claims; online, after batch one, it holds everything known at its end."""
    from sluicegate.data.batches import write_batch
    from sluicegate.features.stages import feature_stage
    from sluicegate.spec import parse_spec

    spec = parse_spec(OTHER_TABLE)
    settings = Settings(home=tmp_path / "home")
    ensure_home(settings.paths)
    planted = pd.DataFrame({"claim_id": ["p1", "p2", "p3"], "policy": "P-planted", "amount": [100.0, 200.0, 300.0],
                            "fraudulent": "No", "filed_at": pd.to_datetime(
                                ["2026-01-10 20:00", "2026-01-10 22:00", "2026-01-10 23:00"], utc=True)})
    one = pd.concat([_claims(2000, "2026-01-01", 10, 1), planted]).sort_values("filed_at", ignore_index=True)
    write_batch(one, settings.paths.raw, "one", spec.timestamp)
    first = feature_stage(settings, spec, one)
    assert first.history_rows == 0

    # Online after batch one: P-planted's 12h count holds all three claims (the last one included),
    # and the time since its last claim is counted from when it is asked.
    store = F.feature_store(settings, spec)
    from sluicegate.serve.predict import FeatureLookup, PredictRequest

    asked = datetime(2026, 1, 11, 1, 0, tzinfo=UTC)
    lookup = FeatureLookup(store, spec)
    online = lookup.fetch([PredictRequest({"policy": "P-planted", "filed_at": asked})])
    assert online["policy_count_12h"][0] == 3
    assert online["policy_time_since_previous"][0] == 2 * 3600  # 23:00 -> 01:00
    assert online["policy_sum_amount_5d"][0] == 600.0
    # The server remembers the events it served: the next request counts from the last one.
    half_past = datetime(2026, 1, 11, 1, 30, tzinfo=UTC)
    later = lookup.fetch([PredictRequest({"policy": "P-planted", "filed_at": half_past})])
    assert later["policy_time_since_previous"][0] == 30 * 60

    late = pd.DataFrame({"claim_id": ["p4"], "policy": "P-planted", "amount": [50.0], "fraudulent": "No",
                         "filed_at": pd.to_datetime(["2026-01-11 01:00"], utc=True)})
    two = pd.concat([_claims(2000, "2026-01-11 02:00", 10, 2), late]).sort_values("filed_at", ignore_index=True)
    write_batch(two, settings.paths.raw, "two", spec.timestamp)
    second = feature_stage(settings, spec, two)
    assert second.history_rows > 0
    row = second.frame.set_index("claim_id").loc["p4"]
    assert row["policy_count_12h"] == 3 and row["policy_sum_amount_5d"] == 600.0
    assert row["policy_time_since_previous"] == 2 * 3600
    # Training and serving agree for the same entity and time; a later batch rewrote no earlier row.
    for name, value in online.items():
        np.testing.assert_allclose(row[name], value[0], rtol=1e-12, equal_nan=True, err_msg=name)
    stored = pd.read_parquet(F.feature_table_paths(settings.paths.features, spec)["policy_features"])
    policies = one["policy"].nunique()  # each batch adds a row per policy at its end: the online row
    assert first.view_rows["policy_features"] == len(one.drop_duplicates(["policy", "filed_at"])) + policies
    assert len(stored) == first.view_rows["policy_features"] + second.view_rows["policy_features"]


def test_entity_shards_give_exactly_the_unsharded_tables(transactions, spec, tmp_path):
    """Every aggregate is per entity: cut by a hash of the key, the shards' tables are the whole table."""
    whole = F.compute_feature_tables(transactions, spec, settings=Settings(home=tmp_path))
    sharded = F.compute_feature_tables(transactions, spec, settings=Settings(home=tmp_path, feature_shard_rows=3000))
    assert len(F.key_shards(transactions, "customer_id", 3000)) == 7
    for view, table in whole.items():
        keys = list(table.columns[:2])
        pd.testing.assert_frame_equal(sharded[view].sort_values(keys, ignore_index=True),
                                      table.sort_values(keys, ignore_index=True))


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
                          F.FEAST_EVENT_TS: start + pd.to_timedelta(rng.integers(0, 6 * 3600, 3000), unit="s")})
    asked = pd.concat([asked, asked.iloc[:300]], ignore_index=True)  # repeated pairs

    found = F._asof_join(asked, view, ["spend", "visits"], tmp_path, F.AsofFileOfflineStoreConfig(),
                          full_feature_names=False)

    expected = pd.merge_asof(asked.reset_index().sort_values(F.FEAST_EVENT_TS), table, left_on=F.FEAST_EVENT_TS,
                             right_on="at", by="account", tolerance=pd.Timedelta(hours=1)).sort_values("index")
    assert 0 < found["spend"].isna().sum() < len(asked)  # some rows are past the ttl or have no key
    pd.testing.assert_frame_equal(found, expected[["spend", "visits"]].reset_index(drop=True))


def test_rolling_windows_are_pandas_groupby_rolling_value_for_value():
    """The bounds found for all keys at once give exactly pandas' per-key time windows [t - w, t)."""
    rng = np.random.default_rng(5)
    n = 20_000
    df = pd.DataFrame({"k": rng.integers(0, 300, n), "v": rng.lognormal(3, 1, n),
                       "t": (pd.Timestamp("2026-01-01", tz="UTC")
                             + pd.to_timedelta(rng.integers(0, 3 * 86400, n), unit="s")).as_unit("ns")})
    df.loc[rng.random(n) < 0.05, "v"] = np.nan
    df = df.sort_values(["k", "t"], kind="stable", ignore_index=True)  # ties in (k, t) included
    for window in (pd.Timedelta("1h"), pd.Timedelta("7d")):
        expected = df.groupby("k", sort=True).rolling(window, on="t", closed="left")["v"]
        got = F._rolling_before(df, "k", "t", window, "v")
        for stat in ("sum", "mean", "std", "min", "max"):
            np.testing.assert_array_equal(getattr(got, stat)().to_numpy(), getattr(expected, stat)().to_numpy(),
                                          err_msg=f"{stat} over {window}")


def test_string_hashes_are_pandas_hashes_of_the_same_strings():
    values = ["a", None, "bb", "a", "ccc", None]
    arrow, objects = pd.Series(values, dtype="string[pyarrow]").iloc[1:], pd.Series(values, dtype=object).iloc[1:]
    np.testing.assert_array_equal(F._column_hash(arrow), pd.util.hash_pandas_object(objects, index=False).to_numpy())
