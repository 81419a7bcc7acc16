"""Alert levels that know what normal variation looks like: the reference cut into windows like the
live one. A steady world watched in 1-hour and 3-hour windows (each holding a few hours of the day, the
reference all of them) calls for no retrain; a shifted amount or category does, naming the column."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sluicegate.features.inputs import build_model_input, logged_inputs
from sluicegate.operate import monitor as m
from sluicegate.operate import steady
from sluicegate.policy import DriftThresholds
from sluicegate.spec import parse_spec

T = DriftThresholds(min_rows=100)
START = pd.Timestamp("2026-10-01", tz="UTC")
SPEC = parse_spec({
    "spec_version": 1, "name": "shop",
    "table": {"id": "order_id", "timestamp": "at", "label": "returned", "positive": True},
    "columns": {"order_id": {"dtype": "string"}, "at": {"dtype": "timestamp"}, "returned": {"dtype": "bool"},
                "amount": {"dtype": "float64"}, "channel": {"dtype": "string", "categories": ["web", "app", "shop"]}},
    "features": {"numeric": [{"column": "amount", "transform": "log1p"}], "categorical": ["channel"],
                 "time": ["hour_of_day"]},
})


def _orders(days: float, per_day: int, seed: int, start: pd.Timestamp, amount_mu: float = 3.0,
            web: float = 0.5) -> pd.DataFrame:
    """Orders through the day (few at night), amounts higher in the evening: hours differ, days do not."""
    rng = np.random.default_rng(seed)
    n = int(days * per_day)
    hour = rng.choice(24, n, p=_daily())
    at = start + pd.to_timedelta(rng.integers(0, int(days), n), unit="D") + pd.to_timedelta(
        hour * 3600 + rng.integers(0, 3600, n), unit="s")
    amount = rng.lognormal(amount_mu + 0.3 * (hour >= 18), 0.6, n)
    channel = rng.choice(["web", "app", "shop"], n, p=[web, (1 - web) * 0.6, (1 - web) * 0.4])
    frame = pd.DataFrame({"order_id": [f"o{seed}-{i}" for i in range(n)], "at": at, "returned": False,
                          "amount": amount, "channel": channel})
    return frame.sort_values("at", kind="stable").reset_index(drop=True)


def _daily() -> np.ndarray:
    weights = 0.2 + np.sin(np.linspace(0, np.pi, 24)) ** 2
    return weights / weights.sum()


def _served(rows: pd.DataFrame) -> pd.DataFrame:
    """What /predict logs for these rows: the raw columns and the model inputs."""
    inputs, names = build_model_input(rows, SPEC), logged_inputs(SPEC)
    frame = pd.DataFrame(inputs.numeric, columns=names["numeric"]).assign(
        **{n: inputs.categorical[:, j] for j, n in enumerate(names["categorical"])})
    return pd.concat([rows[["at", "amount", "channel"]].reset_index(drop=True), frame], axis=1).assign(
        endpoint="predict", score=0.1, logged_at=pd.Timestamp.now(tz="UTC"))


@pytest.fixture(scope="module")
def profile() -> m.ReferenceProfile:
    reference = _orders(14, 8_000, seed=0, start=START)
    return m.build_profile(reference, SPEC, "1", "b", inputs=build_model_input(reference, SPEC))


def _windows(frame: pd.DataFrame, hours: int) -> list[pd.DataFrame]:
    keys = (frame["at"] - frame["at"].min()) // pd.Timedelta(hours=hours)
    return [w for _, w in frame.groupby(keys) if len(w) >= T.min_rows]


def _alarms(profile: m.ReferenceProfile, traffic: pd.DataFrame, hours: int) -> list[list[str]]:
    """The retrain reasons of each window of `hours` of traffic."""
    out = []
    for window in _windows(traffic, hours):
        log = _served(window)
        report = m.drift_report(log, profile, T, window=m.event_window(log, SPEC))
        out.append(m.retrain_reasons(report, T))
    return out


@pytest.mark.parametrize("hours", [1, 3])
def test_a_steady_world_watched_in_short_windows_calls_for_no_retrain(profile, hours):
    steady_days = _orders(2, 8_000, seed=1, start=START + pd.Timedelta(days=14))
    alarms = _alarms(profile, steady_days, hours)
    assert len(alarms) >= 2 * 24 // hours - 6  # a few night hours hold fewer than min_rows
    assert [a for a in alarms if a] == []
    # The same windows against fixed levels only (a profile without its rows' bins): the false alarms
    # this replaces, hour of day first.
    fixed = m.ReferenceProfile(profile.model_version, profile.batch_id, profile.rows, profile.columns)
    before = [a for a in _alarms(fixed, steady_days, hours) if a]
    assert len(before) > len(alarms) // 2 and any("input.hour_of_day" in r for a in before for r in a)


@pytest.mark.parametrize(("shift", "column"), [({"amount_mu": 3.4}, "amount"), ({"web": 0.2}, "channel")])
def test_a_shift_in_a_three_hour_window_is_called_naming_the_column(profile, shift, column):
    day = _orders(1, 8_000, seed=2, start=START + pd.Timedelta(days=14), **shift)
    afternoon = day[(day["at"].dt.hour >= 12) & (day["at"].dt.hour < 15)]
    log = _served(afternoon)
    report = m.drift_report(log, profile, T, window=m.event_window(log, SPEC))
    reasons = m.retrain_reasons(report, T)
    assert any(r.startswith(f"{column} PSI") for r in reasons), report.to_markdown()
    named = {c.name: c for c in report.columns}
    assert named[column].status == "drift" and "above every steady window" in named[column].why
    assert named["input.hour_of_day_sin"].status != "drift", named["input.hour_of_day_sin"].why


def test_steady_windows_follow_the_span_and_fall_back_to_draws_of_the_row_count():
    times = (START + pd.to_timedelta(np.arange(0, 10 * 86_400, 60), unit="s")).to_numpy(dtype="datetime64[ns]")
    cut = steady.steady_windows(len(times), times.astype(np.int64), 100, pd.Timedelta(hours=3))
    assert len(cut.rows) == 2 * 80 - 3 and "windows of 3h" in cut.how  # two offsets, partial ends left out
    assert {len(w) for w in cut.rows} == {100}
    drawn = steady.steady_windows(len(times), None, 100, None)
    assert len(drawn.rows) == steady.RANDOM_WINDOWS and "random draws" in drawn.how


def test_the_family_wide_level_rises_with_the_number_of_columns():
    assert steady.family_z(0.01, 30) > steady.family_z(0.01, 1) > 2.3
