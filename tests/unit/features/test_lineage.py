"""The training set's fingerprint."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from sluicegate.features import lineage


def test_frame_hash_is_stable_and_content_sensitive(transactions):
    df = transactions.head(1000)
    digest = lineage.frame_hash(df)
    assert digest == lineage.frame_hash(df.copy()) == lineage.frame_hash(df.reset_index(drop=True))
    assert len(digest) == 64
    tweaked = df.copy()
    tweaked.iloc[500, tweaked.columns.get_loc("amount")] += 0.01
    assert lineage.frame_hash(tweaked) != digest
    assert lineage.frame_hash(df.rename(columns={"amount": "amount_usd"})) != digest
    assert lineage.frame_hash(df.iloc[::-1]) != digest


def test_frame_hash_in_slices_is_the_whole_frames_hash(transactions, monkeypatch):
    """frame_hash hashes a slice of rows at a time; the slicing must not change the digest."""
    df = transactions.head(1000).astype({"channel": "string[pyarrow]"})
    whole = lineage.frame_hash(df)
    monkeypatch.setattr(lineage, "HASH_ROWS", 7)
    assert lineage.frame_hash(df) == whole
    reference = hashlib.sha256()
    for name, dtype in df.dtypes.items():
        reference.update(f"{name}\x1f{dtype}\x1e".encode())
    reference.update(pd.util.hash_pandas_object(df.astype({"channel": object}), index=False).to_numpy().tobytes())
    assert whole == reference.hexdigest()  # pandas' own row hashes, all rows at once


def test_string_hashes_are_pandas_hashes_of_the_same_strings():
    values = ["a", None, "bb", "a", "ccc", None]
    arrow, objects = pd.Series(values, dtype="string[pyarrow]").iloc[1:], pd.Series(values, dtype=object).iloc[1:]
    np.testing.assert_array_equal(lineage._column_hash(arrow),
                                  pd.util.hash_pandas_object(objects, index=False).to_numpy())
