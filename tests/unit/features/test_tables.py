"""The feature views' parquet files: later batches add rows, never rewrite one."""

from __future__ import annotations

import pandas as pd

from sluicegate.features import catalog, tables


def test_write_feature_tables_adds_later_batches_and_never_rewrites_a_row(built, spec, tmp_path):
    _, _, feature_tables = built
    for name, table in feature_tables.items():  # what writing relies on: one row per (key, timestamp) in each table
        assert not table.duplicated(list(table.columns[:2])).any(), name
    view = catalog.entity_view("customer")
    customer_df = feature_tables[view]
    half = len(customer_df) // 2
    tables.write_feature_tables({view: customer_df.iloc[:half]}, tmp_path, spec)
    changed = customer_df.iloc[half - 10:].assign(cust_txn_count_1h=999)
    tables.write_feature_tables({view: changed}, tmp_path, spec)
    stored = pd.read_parquet(tables.feature_table_paths(tmp_path, spec)[view])
    assert len(stored) == len(customer_df)
    assert (stored["cust_txn_count_1h"] == 999).sum() == len(changed) - 10  # the 10 already there stay
