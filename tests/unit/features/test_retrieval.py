"""The point-in-time training set through Feast's feature service: point-in-time correctness first."""

from __future__ import annotations

import feast
import numpy as np
import pandas as pd

from sluicegate.config import Settings
from sluicegate.features import retrieval

SAMPLE_ROWS = 300


def test_training_features_equal_brute_force_past_only(frame, transactions, spec, brute):
    rng = np.random.default_rng(0)
    for i in rng.choice(len(transactions), size=SAMPLE_ROWS, replace=False):
        expected = brute(transactions, spec, transactions.iloc[i])
        for name, value in expected.items():
            np.testing.assert_allclose(frame.iloc[i][name], value, rtol=1e-9, atol=1e-9, equal_nan=True,
                                       err_msg=f"row {i} {name}")


def test_future_transactions_do_not_leak(frame, transactions, spec, build_home, tmp_path):
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
    _, store, _ = build_home(planted, spec, tmp_path)
    after = retrieval.training_frame(store, transactions, spec)

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
    messy_frame = retrieval.training_frame(store, messy, spec)
    assert len(messy_frame) == len(messy)
    assert messy_frame[spec.id].tolist() == messy[spec.id].tolist()
    names = [a.feature_name for a in spec.features.aggregates]
    expected = frame.set_index(spec.id).loc[messy[spec.id], names].reset_index(drop=True)
    pd.testing.assert_frame_equal(messy_frame[names].reset_index(drop=True), expected)


def test_offline_features_read_the_tables_own_store(built, frame, transactions, spec):
    """offline_features opens the table's store from settings alone: the training frame's features."""
    settings, _, _ = built
    rows = transactions.iloc[::7]
    got = retrieval.offline_features(Settings(home=settings.home), spec, rows)
    pd.testing.assert_frame_equal(got, frame.iloc[::7].reset_index(drop=True))


def test_any_spec_string_keys_and_every_aggregation_are_point_in_time_correct(claims_spec, build_home, brute,
                                                                              tmp_path):
    spec = claims_spec
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
    settings, store, _ = build_home(rows, spec, tmp_path)
    frame = retrieval.training_frame(store, rows, spec)
    assert sorted(e.name for e in store.list_entities()) == ["policy", "row"]
    assert store.get_entity("policy").value_type == feast.ValueType.STRING
    # The row view serves the row's own model columns, keyed by its id, offline only.
    row_view = store.get_feature_view("row_features")
    assert store.get_entity("row").join_key == "claim_id" and not row_view.online
    assert [f.name for f in row_view.features] == ["amount"]
    np.testing.assert_array_equal(frame["amount"].to_numpy(), rows["amount"].to_numpy())
    assert list(frame.columns[:len(rows.columns)]) == list(rows.columns)
    for i in rng.choice(n, size=150, replace=False):
        for name, value in brute(rows, spec, rows.iloc[i]).items():
            np.testing.assert_allclose(frame.iloc[i][name], value, rtol=1e-9, atol=1e-9, equal_nan=True,
                                       err_msg=f"row {i} {name}")
