"""Point-in-time aggregates from raw events: windows, shards and history across batches."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sluicegate.config import Settings, ensure_home
from sluicegate.features import aggregates, catalog, tables


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


def test_a_batch_with_its_history_gets_the_rows_of_both_batches_together(claims_spec):
    """History shapes a batch's windows but gets no rows: the batch's table is exactly the rows of the
    table computed over both batches at once that fall in the batch."""
    spec = claims_spec
    one, two = _claims(1500, "2026-01-01", 10, 3), _claims(1500, "2026-01-11", 10, 4)
    assert aggregates.history_reach(spec) == pd.Timedelta("20d")  # the longest window
    history = one[aggregates.history_columns(spec)]
    assert list(history.columns) == ["policy", "filed_at", "amount", "fraudulent"]
    view = catalog.entity_view("policy")
    batch = aggregates.compute_feature_tables(two, spec, history)[view]
    cold = aggregates.compute_feature_tables(two, spec)[view]
    whole = aggregates.compute_feature_tables(pd.concat([one, two], ignore_index=True), spec)[view]
    expected = whole[whole["filed_at"] >= two["filed_at"].min()].reset_index(drop=True)
    pd.testing.assert_frame_equal(batch, expected)
    assert len(batch) == len(two.drop_duplicates(["policy", "filed_at"]))
    assert not cold["policy_count_12h"].equals(batch["policy_count_12h"])  # not vacuous: history counts


def test_a_second_batch_sees_the_first_batchs_history(claims_spec, tmp_path):
    """A policy active only at the end of batch one and once at the start of batch two: its batch-two
    row counts the batch-one claims, and its time since previous is the gap to the last of them."""
    from sluicegate.data.batches import write_batch
    from sluicegate.features.stages import feature_stage

    spec = claims_spec
    settings = Settings(home=tmp_path / "home")
    ensure_home(settings.paths)
    planted = pd.DataFrame({"claim_id": ["p1", "p2", "p3"], "policy": "P-planted", "amount": [100.0, 200.0, 300.0],
                            "fraudulent": "No", "filed_at": pd.to_datetime(
                                ["2026-01-10 20:00", "2026-01-10 22:00", "2026-01-10 23:00"], utc=True)})
    one = pd.concat([_claims(2000, "2026-01-01", 10, 1), planted]).sort_values("filed_at", ignore_index=True)
    write_batch(one, settings.paths.raw, "one", spec.timestamp)
    first = feature_stage(settings, spec, one)
    assert first.history_rows == 0

    late = pd.DataFrame({"claim_id": ["p4"], "policy": "P-planted", "amount": [50.0], "fraudulent": "No",
                         "filed_at": pd.to_datetime(["2026-01-11 01:00"], utc=True)})
    two = pd.concat([_claims(2000, "2026-01-11 02:00", 10, 2), late]).sort_values("filed_at", ignore_index=True)
    write_batch(two, settings.paths.raw, "two", spec.timestamp)
    second = feature_stage(settings, spec, two)
    assert second.history_rows > 0
    row = second.frame.set_index("claim_id").loc["p4"]
    assert row["policy_count_12h"] == 3 and row["policy_sum_amount_5d"] == 600.0
    assert row["policy_time_since_previous"] == 2 * 3600  # 23:00 -> 01:00, across the batches
    # One row per (policy, timestamp) of each batch; a later batch rewrote no earlier row.
    stored = pd.read_parquet(tables.feature_table_paths(settings.paths.features, spec)["policy_features"])
    assert first.view_rows["policy_features"] == len(one.drop_duplicates(["policy", "filed_at"]))
    assert second.view_rows["policy_features"] == len(two.drop_duplicates(["policy", "filed_at"]))
    assert len(stored) == first.view_rows["policy_features"] + second.view_rows["policy_features"]


def test_entity_shards_give_exactly_the_unsharded_tables(transactions, spec, tmp_path):
    """Every aggregate is per entity: cut by a hash of the key, the shards' tables are the whole table."""
    whole = aggregates.compute_feature_tables(transactions, spec, settings=Settings(home=tmp_path))
    sharded = aggregates.compute_feature_tables(transactions, spec,
                                                settings=Settings(home=tmp_path, feature_shard_rows=3000))
    assert len(aggregates.key_shards(transactions, "customer_id", 3000)) == 7
    for view, table in whole.items():
        keys = list(table.columns[:2])
        pd.testing.assert_frame_equal(sharded[view].sort_values(keys, ignore_index=True),
                                      table.sort_values(keys, ignore_index=True))


def test_time_since_previous_is_the_gap_to_the_keys_previous_distinct_timestamp(spec):
    """Stored in the entity view as seconds since the key's previous distinct timestamp, NaN for its first."""
    at = pd.Timestamp("2026-02-01", tz="UTC")
    rows = pd.DataFrame({"transaction_id": ["a", "b", "c", "d", "e"], "customer_id": [1, 1, 1, 2, 1],
                         "merchant_id": 7, "amount": 10.0, "is_fraud": 0,
                         spec.timestamp: [at, at + pd.Timedelta("90s"), at + pd.Timedelta("90s"),
                                          at + pd.Timedelta("100s"), at + pd.Timedelta("1h")]})
    table = aggregates.compute_feature_tables(rows, spec)[catalog.entity_view("customer")]
    gaps = table.set_index(["customer_id", spec.timestamp])["cust_seconds_since_prev"]
    assert len(table) == 4  # (1, +90s) once
    np.testing.assert_array_equal(gaps.loc[1].to_numpy(), [np.nan, 90.0, 3600.0 - 90.0])
    assert np.isnan(gaps.loc[2].iloc[0])


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
        got = aggregates._rolling_before(df, "k", "t", window, "v")
        for stat in ("sum", "mean", "std", "min", "max"):
            np.testing.assert_array_equal(getattr(got, stat)().to_numpy(), getattr(expected, stat)().to_numpy(),
                                          err_msg=f"{stat} over {window}")
