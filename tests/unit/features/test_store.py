"""Feature engineering and the Feast round trip: point-in-time correctness first."""

from __future__ import annotations

import feast
import numpy as np
import pandas as pd
import pytest

from sluicegate.config import Settings, ensure_home
from sluicegate.data.synthetic import GenerateConfig, generate_transactions
from sluicegate.features import store as F
from sluicegate.spec import load_spec

SAMPLE_ROWS = 300


@pytest.fixture(scope="module")
def spec():
    return load_spec()


@pytest.fixture(scope="module")
def transactions(spec):
    return generate_transactions(GenerateConfig(rows=20000, days=10, seed=3), spec)


def build(transactions: pd.DataFrame, spec, home) -> tuple[Settings, feast.FeatureStore, tuple]:
    """Transform, write and apply into a fresh home."""
    settings = Settings(home=home)
    ensure_home(settings.paths)
    tables = F.compute_feature_tables(transactions, spec)
    F.write_feature_tables(*tables, settings.paths.features)
    store = F.feature_store(settings)
    F.apply_definitions(store, settings)
    return settings, store, tables


@pytest.fixture(scope="module")
def built(transactions, spec, tmp_path_factory):
    return build(transactions, spec, tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="module")
def frame(built, transactions, spec):
    _, store, _ = built
    return F.training_frame(store, transactions, spec)


def brute_force(transactions: pd.DataFrame, spec, customer: int, merchant: int, at: pd.Timestamp) -> dict:
    """Every feature recomputed from the raw rows strictly before `at`, one row at a time."""
    ts = transactions[spec.timestamp]
    cust = transactions[(transactions[spec.entities.customer] == customer) & (ts < at)]
    merch = transactions[(transactions[spec.entities.merchant] == merchant) & (ts < at)]
    cust_ts, merch_ts = cust[spec.timestamp], merch[spec.timestamp]
    week = cust.loc[cust_ts >= at - pd.Timedelta("7D"), spec.amount]
    # A label is known only LABEL_DELAY after its transaction.
    known = (merch_ts + F.LABEL_DELAY <= at) & (merch_ts >= at - pd.Timedelta("30D"))
    labelled = merch.loc[known, spec.label]
    return {
        "cust_txn_count_1h": int((cust_ts >= at - pd.Timedelta("1h")).sum()),
        "cust_txn_count_24h": int((cust_ts >= at - pd.Timedelta("24h")).sum()),
        "cust_amount_mean_7d": week.mean() if len(week) else np.nan,
        "cust_amount_std_7d": week.std(ddof=1) if len(week) > 1 else np.nan,
        "cust_minutes_since_prev": (at - cust_ts.max()).total_seconds() / 60 if len(cust) else np.nan,
        "merch_txn_count_24h": int((merch_ts >= at - pd.Timedelta("24h")).sum()),
        "merch_fraud_rate_30d": labelled.mean() if len(labelled) else np.nan,
    }


def test_training_features_equal_brute_force_past_only(frame, transactions, spec):
    rng = np.random.default_rng(0)
    rows = rng.choice(len(frame), SAMPLE_ROWS, replace=False)
    for i in rows:
        row = frame.iloc[i]
        expected = brute_force(transactions, spec, row[spec.entities.customer],
                               row[spec.entities.merchant], row[spec.timestamp])
        for name in F.FEATURE_NAMES:
            np.testing.assert_allclose(row[name], expected[name], rtol=1e-7, atol=1e-7, equal_nan=True,
                                       err_msg=f"row {i} feature {name}")
    # The sample must exercise the lagged fraud rate, not only its missing values.
    assert frame.iloc[rows]["merch_fraud_rate_30d"].gt(0).sum() > 10


def test_future_transactions_do_not_leak(frame, transactions, spec, tmp_path):
    cust_key, merch_key, ts = spec.entities.customer, spec.entities.merchant, spec.timestamp
    busiest = transactions[cust_key].value_counts().index[0]
    mine = transactions.index[transactions[cust_key] == busiest]
    event = mine[len(mine) // 2]
    at = transactions.loc[event, ts]
    next_event = mine[transactions.loc[mine, ts] > at][0]
    # A huge fraud just after the event; a fraud just before it whose label is not yet known.
    future = transactions.loc[[event]].assign(**{ts: at + pd.Timedelta("1s"), spec.amount: 49_999.0,
                                                 spec.label: 1, spec.id: "planted-future"})
    unlabelled = transactions.loc[[event]].assign(**{ts: at - pd.Timedelta("12h"), spec.label: 1,
                                                     spec.id: "planted-unlabelled", cust_key: -1})
    planted = pd.concat([transactions, future, unlabelled], ignore_index=True)
    planted = planted.sort_values(ts, kind="stable", ignore_index=True)
    _, store, _ = build(planted, spec, tmp_path)
    after = F.training_frame(store, transactions, spec)

    unchanged = [n for n in F.FEATURE_NAMES if n != "merch_txn_count_24h"]
    pd.testing.assert_series_equal(after.loc[event, unchanged], frame.loc[event, unchanged])
    # The unlabelled fraud is a past transaction, so it counts; its label does not, yet.
    assert after.loc[event, "merch_txn_count_24h"] == frame.loc[event, "merch_txn_count_24h"] + 1
    # Not vacuous: the planted rows are visible where they should be.
    assert after.loc[next_event, "cust_amount_mean_7d"] > frame.loc[next_event, "cust_amount_mean_7d"]
    merchant = transactions.loc[event, merch_key]
    later = transactions.index[(transactions[merch_key] == merchant) & (transactions[ts] > at)]
    assert (after.loc[later, "merch_fraud_rate_30d"] != frame.loc[later, "merch_fraud_rate_30d"]).any()


def test_training_frame_one_row_per_transaction_in_order(built, frame, transactions, spec):
    assert list(frame.columns) == list(transactions.columns) + F.FEATURE_NAMES
    pd.testing.assert_frame_equal(frame[transactions.columns], transactions)
    for name in F.FEATURE_NAMES:
        assert frame[name].dtype == ("int64" if name in F.COUNT_FEATURES else "float64"), name

    # Shuffled, with exact duplicate rows: still one output row per input row, in input order.
    _, store, _ = built
    rng = np.random.default_rng(1)
    messy = pd.concat([transactions, transactions.iloc[:500]]).iloc[rng.permutation(len(transactions) + 500)]
    messy_frame = F.training_frame(store, messy, spec)
    assert len(messy_frame) == len(messy)
    assert messy_frame[spec.id].tolist() == messy[spec.id].tolist()
    expected = frame.set_index(spec.id).loc[messy[spec.id], F.FEATURE_NAMES].reset_index(drop=True)
    pd.testing.assert_frame_equal(messy_frame[F.FEATURE_NAMES].reset_index(drop=True), expected)


def test_fast_offline_store_matches_feast_dask_store(built, frame, transactions, spec):
    settings, _, _ = built
    dask_store = feast.FeatureStore(config=F.repo_config(settings, fast_retrieval=False))
    stock = F.training_frame(dask_store, transactions, spec)
    pd.testing.assert_frame_equal(stock, frame)


def test_apply_is_idempotent_and_online_serves_latest(built, transactions, spec):
    settings, store, (customer_df, merchant_df) = built

    def registered():
        return (sorted(e.name for e in store.list_entities()),
                sorted((v.name, tuple(f.name for f in v.features)) for v in store.list_feature_views()),
                [s.name for s in store.list_feature_services()])

    before = registered()
    F.apply_definitions(store, settings)
    F.apply_definitions(store, settings)
    assert registered() == before
    assert before[2] == [F.FEATURE_SERVICE]

    F.materialize(store, transactions[spec.timestamp].max().to_pydatetime() + pd.Timedelta("1s"))
    customer = int(transactions[spec.entities.customer].value_counts().index[0])
    merchant = int(transactions[spec.entities.merchant].value_counts().index[0])
    online = F.online_features(store, [customer], [merchant]).iloc[0]
    cust_key, merch_key = spec.entities.customer, spec.entities.merchant
    latest_cust = customer_df[customer_df[cust_key] == customer].iloc[-1]
    latest_merch = merchant_df[merchant_df[merch_key] == merchant].iloc[-1]
    for name in F.CUSTOMER_FEATURES:
        np.testing.assert_allclose(online[name], latest_cust[name], rtol=1e-12, equal_nan=True, err_msg=name)
    for name in F.MERCHANT_FEATURES:
        np.testing.assert_allclose(online[name], latest_merch[name], rtol=1e-12, equal_nan=True, err_msg=name)

    # Re-applying keeps the materialization watermark: the next run is incremental.
    F.apply_definitions(store, settings)
    assert all(v.most_recent_end_time is not None for v in store.list_feature_views())


def test_write_feature_tables_merges_later_batches(built, tmp_path):
    _, _, (customer_df, merchant_df) = built
    half = len(customer_df) // 2
    F.write_feature_tables(customer_df.iloc[:half], merchant_df, tmp_path)
    changed = customer_df.iloc[half - 10:].assign(cust_txn_count_1h=999)
    F.write_feature_tables(changed, merchant_df, tmp_path)
    stored = pd.read_parquet(F.feature_table_paths(tmp_path)[F.CUSTOMER_VIEW])
    assert len(stored) == len(customer_df)
    assert (stored["cust_txn_count_1h"] == 999).sum() == len(changed)


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
