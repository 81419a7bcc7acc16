"""The held-out table: kept with its rows, so a champion of another spec is scored on its own inputs."""

import numpy as np
import pandas as pd
import pytest

from sluicegate.config import Settings
from sluicegate.features.inputs import build_model_input
from sluicegate.ship.holdout import holdout_frame, own_inputs, read_holdout, with_raw_rows
from sluicegate.spec import load_spec, parse_spec


@pytest.fixture(scope="module")
def spec():
    return load_spec(Settings().spec_path)


def _rows(spec, n=500):
    rng = np.random.default_rng(3)
    return pd.DataFrame({
        **{f.column: rng.gamma(2.0, 30.0, n) for f in spec.features.numeric_columns},
        spec.timestamp: pd.Timestamp("2026-10-01", tz="UTC") + pd.to_timedelta(np.arange(n) * 60, unit="s"),
        **{c: rng.choice(spec.categories(c), n) for c in spec.categorical_features},
        **{name: rng.uniform(0, 5, n) for name in spec.feature_columns},
        spec.label: (rng.random(n) < 0.1).astype(np.int64),
    })


def _changed(spec, change):
    raw = spec.model_dump(mode="json")
    change(raw)
    return parse_spec(raw)


def _kept(spec, rows, tmp_path):
    """The held-out table as the candidate's evidence keeps it, through parquet."""
    inputs = build_model_input(rows, spec)
    frame = with_raw_rows(holdout_frame(inputs, rows[spec.label].to_numpy(float), {}, spec), rows)
    frame.to_parquet(tmp_path / "holdout.parquet", index=False)
    return pd.read_parquet(tmp_path / "holdout.parquet")


def test_a_champion_of_another_spec_gets_its_own_inputs_of_the_same_rows(spec, tmp_path):
    def no_transform(raw):
        raw["features"]["numeric"][0]["transform"] = "none"

    def fewer_categories(raw):
        column = raw["features"]["categorical"][0]
        raw["columns"][column]["categories"] = raw["columns"][column]["categories"][:2]

    rows = _rows(spec)
    candidate = _changed(spec, no_transform)
    kept = _kept(candidate, rows, tmp_path)
    np.testing.assert_array_equal(read_holdout(kept, candidate)[0].numeric, build_model_input(rows, candidate).numeric)
    for champion in (spec, _changed(spec, fewer_categories)):
        got, expected = own_inputs(kept, champion), build_model_input(rows, champion)
        np.testing.assert_array_equal(got.numeric, expected.numeric)
        np.testing.assert_array_equal(got.categorical, expected.categorical)


def test_a_champion_reading_a_column_the_rows_lack_is_named(spec, tmp_path):
    rows = _rows(spec)
    dropped = spec.features.aggregates[-1].feature_name

    def one_aggregate_fewer(raw):
        raw["features"]["aggregates"] = raw["features"]["aggregates"][:-1]

    candidate = _changed(spec, one_aggregate_fewer)
    kept = _kept(candidate, rows.drop(columns=[dropped]), tmp_path)
    assert dropped in own_inputs(kept, spec)
    assert own_inputs(kept.drop(columns=[c for c in kept.columns if c.startswith("raw:")]), spec) == \
        "the held-out table was kept without its rows"
