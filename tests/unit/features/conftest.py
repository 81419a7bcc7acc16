"""Shared fixtures of the feature tests: the example table's transactions transformed, written and
applied into one Feast store; a second table (string keys, every aggregation) for the same checks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import feast
import numpy as np
import pandas as pd
import pytest

from sluicegate.config import Settings, ensure_home
from sluicegate.data.synthetic import GenerateConfig, generate_transactions
from sluicegate.features import aggregates, definitions, retrieval, tables
from sluicegate.spec import DatasetSpec, load_spec, parse_spec

Built = tuple[Settings, feast.FeatureStore, dict[str, pd.DataFrame]]

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


def build(rows: pd.DataFrame, spec: DatasetSpec, home: Path) -> Built:
    """Transform, write and apply into a fresh home."""
    settings = Settings(home=home)
    ensure_home(settings.paths)
    feature_tables = aggregates.feature_tables(rows, spec)
    tables.write_feature_tables(feature_tables, settings.paths.features, spec)
    store = definitions.feature_store(settings, spec)
    definitions.apply_definitions(store, spec, settings)
    return settings, store, feature_tables


def brute_force(rows: pd.DataFrame, spec: DatasetSpec, row: pd.Series) -> dict:
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


@pytest.fixture(scope="session")
def build_home() -> Callable[[pd.DataFrame, DatasetSpec, Path], Built]:
    """`build`: rows transformed, written and applied into a fresh home."""
    return build


@pytest.fixture(scope="session")
def brute() -> Callable[[pd.DataFrame, DatasetSpec, pd.Series], dict]:
    """`brute_force`: a row's aggregates recomputed from the raw rows."""
    return brute_force


@pytest.fixture(scope="session")
def spec() -> DatasetSpec:
    return load_spec()


@pytest.fixture(scope="session")
def claims_spec() -> DatasetSpec:
    """A second table: string keys and ids, every aggregation, a 2-day label delay."""
    return parse_spec(OTHER_TABLE)


@pytest.fixture(scope="session")
def transactions(spec):
    return generate_transactions(GenerateConfig(rows=20000, days=10, seed=3), spec)


@pytest.fixture(scope="session")
def built(transactions, spec, tmp_path_factory) -> Built:
    return build(transactions, spec, tmp_path_factory.mktemp("home"))


@pytest.fixture(scope="session")
def frame(built, transactions, spec):
    _, store, _ = built
    return retrieval.training_frame(store, transactions, spec)
