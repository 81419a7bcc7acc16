"""The online aggregates against the offline transformation: the same value for every event, on a table
with other types than the example's (string and integer keys, nullable values, fractional and tied
timestamps, a label delay), and the state's rules (retries, out-of-order events, late labels, batches
that replace days)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sluicegate.features import aggregates, online
from sluicegate.spec import parse_spec

AGGREGATES = [
    {"entity": "card", "agg": "count", "window": "1h", "name": "card_n_1h"},
    {"entity": "card", "agg": "sum", "column": "spend", "window": "6h", "name": "card_sum_6h"},
    {"entity": "card", "agg": "mean", "column": "spend", "window": "1d", "name": "card_mean_1d"},
    {"entity": "card", "agg": "std", "column": "spend", "window": "1d", "name": "card_std_1d"},
    {"entity": "card", "agg": "time_since_previous", "name": "card_gap"},
    {"entity": "shop", "agg": "min", "column": "spend", "window": "12h", "name": "shop_min_12h"},
    {"entity": "shop", "agg": "max", "column": "items", "window": "12h", "name": "shop_max_12h"},
    {"entity": "shop", "agg": "label_rate", "window": "2d", "name": "shop_bad_2d"},
]


def orders_spec(**features):
    """A table of orders with string card keys, integer shop keys, a nullable amount and a boolean label;
    `features` adds to its features (e.g. python=...)."""
    return parse_spec({
        "spec_version": 1, "name": "orders", "predicts": "whether an order is bad",
        "table": {"id": "order_ref", "timestamp": "placed", "label": "bad", "positive": True,
                  "label_rate": [0.0, 1.0], "label_delay": "3h"},
        "columns": {"order_ref": {"dtype": "int64"}, "placed": {"dtype": "timestamp"},
                    "card": {"dtype": "string"}, "shop": {"dtype": "int64"},
                    "spend": {"dtype": "float64", "nullable": True}, "items": {"dtype": "int64"},
                    "bad": {"dtype": "bool"}},
        "entities": {"card": {"key": "card"}, "shop": {"key": "shop"}},
        "features": {"numeric": ["spend"], "aggregates": AGGREGATES, **features}})


@pytest.fixture(scope="module")
def spec():
    return orders_spec()


def orders(n: int, seed: int, start: str = "2026-03-01") -> pd.DataFrame:
    """Orders over four days: few cards and shops, so windows hold many events; a tenth of the times
    repeat an earlier one exactly, a tenth of the amounts are missing."""
    rng = np.random.default_rng(seed)
    seconds = np.sort(rng.uniform(0, 4 * 86_400, n))
    ties = rng.random(n) < 0.1
    seconds[1:][ties[1:]] = seconds[:-1][ties[1:]]
    spend = rng.lognormal(3, 1, n)
    spend[rng.random(n) < 0.1] = np.nan
    return pd.DataFrame({
        "order_ref": np.arange(n) + seed * 10**6,
        "placed": pd.Timestamp(start, tz="UTC") + pd.to_timedelta(np.round(seconds, 6), unit="s"),
        "card": rng.choice([f"c-{i}" for i in range(12)], n), "shop": rng.integers(0, 5, n),
        "spend": spend, "items": rng.integers(1, 9, n), "bad": rng.random(n) < 0.2})


def offline(rows: pd.DataFrame, spec, history: pd.DataFrame | None = None) -> pd.DataFrame:
    """Each row's aggregates as the offline transformation computes them (its (key, time) row)."""
    tables = aggregates.compute_feature_tables(rows, spec, history)
    out = rows[["card", "shop", "placed"]].copy()
    for entity, key in (("card", "card"), ("shop", "shop")):
        out = out.merge(tables[f"{entity}_features"], on=[key, "placed"], how="left")
    return out[[a["name"] for a in AGGREGATES]].set_axis(rows.index)


def assert_same(served: pd.DataFrame, expected: pd.DataFrame) -> None:
    for name in expected.columns:
        a, b = served[name].to_numpy(float), expected[name].to_numpy(float)
        same = np.isclose(a, b, rtol=1e-9, atol=1e-9) | (np.isnan(a) & np.isnan(b))
        assert same.all(), f"{name}: {np.count_nonzero(~same)} of {len(a)} rows differ, e.g. " \
                           f"served {a[~same][:3]} offline {b[~same][:3]}"


def test_every_event_gets_the_offline_value(spec, tmp_path):
    rows = orders(1500, seed=1)
    state = online.SqliteEventState(tmp_path / "events.db", width=2)
    served = online.replay(spec, rows.iloc[:0], rows, state)
    expected = offline(rows, spec)
    # The windows hold events: the comparison is not of empty windows.
    assert expected["card_n_1h"].gt(0).mean() > 0.5 and expected["shop_bad_2d"].notna().mean() > 0.5
    assert_same(served, expected)


def test_a_window_replayed_after_earlier_batches_gets_the_offline_value(spec, tmp_path):
    """The state reconciled with the earlier rows (as a landed batch), then the next day served."""
    rows = orders(1500, seed=2)
    cut = rows["placed"].iloc[1000]
    prior, later = rows[rows["placed"] < cut], rows[rows["placed"] >= cut]
    served = online.replay(spec, prior, later, online.SqliteEventState(tmp_path / "events.db", width=2))
    assert_same(served, offline(later, spec, history=prior))


@pytest.fixture
def live(spec, tmp_path):
    return online.OnlineFeatures(spec, online.SqliteEventState(tmp_path / "events.db", width=2))


def _event(live, when: str, ref: int, card: str = "c-1", shop: int = 1, spend: float = 10.0):
    return live.event({"placed": pd.Timestamp(when, tz="UTC"), "card": card, "shop": shop, "spend": spend,
                       "items": 2}, ref)


def test_a_retried_request_is_not_counted_twice(live):
    first = _event(live, "2026-03-01T10:00:00", 1)
    live.score([first])
    live.score([first])  # the same id again: a client's retry
    later, _ = live.score([_event(live, "2026-03-01T10:30:00", 2)])
    assert later["card_n_1h"][0] == 1 and later["card_sum_6h"][0] == 10.0


def test_an_event_within_a_batch_counts_for_the_later_ones(live):
    events = [_event(live, "2026-03-01T10:05:00", 2), _event(live, "2026-03-01T10:00:00", 1)]
    found, refused = live.score(events)
    assert refused == [None, None]
    assert list(found["card_n_1h"]) == [1.0, 0.0] and found["card_gap"][0] == 300.0


def test_an_event_older_than_the_state_keeps_is_refused_with_the_reason(live):
    live.score([_event(live, "2026-03-10T10:00:00", 1)])
    _, refused = live.score([_event(live, "2026-03-01T10:00:00", 2)])
    assert isinstance(refused[0], online.OutsideState) and "older than the online state keeps" in str(refused[0])
    late, refused = live.score([_event(live, "2026-03-10T09:00:00", 3)])  # out of order, within reach: scored
    assert refused == [None] and late["card_n_1h"][0] == 0


def test_a_missing_entity_key_is_refused(live):
    with pytest.raises(online.OutsideState, match="card: the entity key is missing"):
        live.event({"placed": pd.Timestamp("2026-03-01", tz="UTC"), "card": None, "shop": 1, "spend": 1.0,
                    "items": 1}, 1)


def test_late_labels_count_once_known(live):
    live.score([_event(live, "2026-03-01T00:00:00", 1)])
    assert live.label({"1": 1.0, "404": 0.0}) == 2  # the event is held once per entity: card and shop
    early, _ = live.score([_event(live, "2026-03-01T02:00:00", 2)])  # label_delay 3h: not known yet
    known, _ = live.score([_event(live, "2026-03-01T03:00:00", 3)])
    assert np.isnan(early["shop_bad_2d"][0]) and known["shop_bad_2d"][0] == 1.0


def test_a_batch_replaces_the_days_it_covers_and_keeps_the_others(spec, live):
    live.score([_event(live, "2026-03-01T21:00:00", 1), _event(live, "2026-03-02T01:00:00", 2)])
    batch = pd.DataFrame({"order_ref": [7, 8], "placed": pd.to_datetime(["2026-03-01T20:00", "2026-03-01T20:30"],
                                                                          utc=True),
                          "card": ["c-1", "c-1"], "shop": [1, 1], "spend": [1.0, 2.0], "items": [1, 1],
                          "bad": [False, True]})
    live.reconcile(batch)
    found, _ = live.score([_event(live, "2026-03-02T02:00:00", 3)])
    # Day one is the batch's two events (the served one at 21:00 is gone); day two's served event stays.
    assert found["card_mean_1d"][0] == pytest.approx((1.0 + 2.0 + 10.0) / 3)
    assert live.state.stats() == {"events": 2 * 4, "entity_keys": 2}
