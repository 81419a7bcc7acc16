"""The feature views' parquet files: what Feast's offline store reads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from sluicegate.features import catalog
from sluicegate.spec import DatasetSpec


def feature_table_paths(features_dir: Path, spec: DatasetSpec) -> dict[str, Path]:
    """Parquet file of each view (the rows', then each entity's), the FileSource Feast reads."""
    views = [catalog.row_view()] + [catalog.entity_view(e) for e in catalog.served_entities(spec)]
    return {view: features_dir / f"{view}.parquet" for view in views}


def write_feature_tables(tables: dict[str, pd.DataFrame], features_dir: Path, spec: DatasetSpec) -> None:
    """Add every table's rows to its view's file; a row already there for an (entity, timestamp) stays:
    a later batch never rewrites what earlier training runs were served and trained on."""
    paths = feature_table_paths(features_dir, spec)
    features_dir.mkdir(parents=True, exist_ok=True)
    for view, table in tables.items():
        _merge_and_replace(table, paths[view], keys=list(table.columns[:2]))


def _merge_and_replace(new: pd.DataFrame, path: Path, keys: list[str]) -> None:
    """The file's rows, then each row of `new` whose (key, timestamp) the file does not have yet.

    `new` has one row per (key, timestamp), as every feature table is built (the row view's key is the
    validated unique row id), so only repeats of the file's rows are looked for, and only where they can
    be: within the file's time span. Deduplicating the whole table hashed every key (10M string ids: 7 s)."""
    table = new
    if path.exists():
        old = pd.read_parquet(path)
        table = pd.concat([old, new[~_already_in(new, old, keys)]], ignore_index=True)
    # In time order (ties as they came: earlier batches first); sorting on the key as well cost a
    # sort of every string key.
    table = table.sort_values(keys[1], kind="stable")
    # Write aside and rename, so a reader (or a crash) never sees half a table.
    tmp = path.with_suffix(".parquet.tmp")
    table.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def _already_in(new: pd.DataFrame, old: pd.DataFrame, keys: list[str]) -> np.ndarray:
    """Which rows of `new` repeat a (key, timestamp) of `old`; only those inside old's time span can."""
    ts = keys[1]
    inside = ((new[ts] >= old[ts].min()) & (new[ts] <= old[ts].max())).to_numpy()
    repeated = np.zeros(len(new), bool)
    if inside.any():
        candidates = new.loc[inside, keys]
        near = (old[ts] >= candidates[ts].min()) & (old[ts] <= candidates[ts].max())
        repeated[inside] = pd.MultiIndex.from_frame(candidates).isin(pd.MultiIndex.from_frame(old.loc[near, keys]))
    return repeated
