"""Drift statistics on known distributions, the prediction-log reader, and the
retrain trigger's thresholds, cooldown and dedupe."""

from __future__ import annotations

import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sluicegate.operate import monitor as m

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
T = m.DriftThresholds(psi_warn=0.1, psi_retrain=0.25, score_psi_retrain=0.25, min_recall=0.5,
                      cooldown_hours=6, min_rows=100)


REPO = Path(__file__).resolve().parents[3]


def test_psi_is_zero_for_identical_shares_and_matches_the_formula():
    assert m.psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    # (0.6-0.5)ln(0.6/0.5) + (0.4-0.5)ln(0.4/0.5)
    assert m.psi([0.5, 0.5], [0.6, 0.4]) == pytest.approx(0.1 * np.log(1.2) - 0.1 * np.log(0.8))


def test_numeric_psi_small_for_same_normal_and_large_for_shifted_one():
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 1, 50_000)
    edges = m.numeric_edges(ref)
    expected = m.numeric_shares(ref, edges)
    assert len(edges) == 9 and expected[:-1] == pytest.approx(np.full(10, 0.1), abs=1e-3)
    same = m.psi(expected, m.numeric_shares(rng.normal(0, 1, 20_000), edges))
    # A one-sigma shift of a normal has a PSI near 1 with decile bins.
    shifted = m.psi(expected, m.numeric_shares(rng.normal(1, 1, 20_000), edges))
    assert same < 0.01
    assert 0.7 < shifted < 1.3


def test_numeric_bins_are_fixed_by_the_reference_and_missing_values_have_their_own_bin():
    edges = m.numeric_edges(np.arange(100.0))
    shares = m.numeric_shares(np.array([1000.0, np.nan, -5.0, np.nan]), edges)
    assert shares[-1] == 0.5  # missing
    assert shares[0] == 0.25 and shares[-2] == 0.25  # out of range falls into the open outer bins


def test_categorical_psi_and_chi_square_see_a_shift_and_an_unseen_category():
    cats = ["a", "b", "c"]
    ref = pd.Series(["a"] * 500 + ["b"] * 300 + ["c"] * 200)
    expected = m.categorical_shares(ref, cats)
    assert expected.tolist() == [0.5, 0.3, 0.2, 0.0, 0.0]
    same = pd.Series(["a"] * 250 + ["b"] * 150 + ["c"] * 100)
    flipped = pd.Series(["a"] * 100 + ["b"] * 150 + ["c"] * 250)
    assert m.psi(expected, m.categorical_shares(same, cats)) == pytest.approx(0.0, abs=1e-9)
    assert m.psi(expected, m.categorical_shares(flipped, cats)) > 0.25
    assert m.chi_square_p(expected, m.categorical_shares(same, cats) * 500) > 0.9
    assert m.chi_square_p(expected, m.categorical_shares(flipped, cats) * 500) < 1e-6
    unseen = pd.Series(["a"] * 499 + ["zz"])
    assert m.chi_square_p(expected, m.categorical_shares(unseen, cats) * 500) == 0.0


def _log(n: int, amount_mu: float = 3.4, score_shift: float = 0.0, seed: int = 1) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "transaction_id": [f"t{i}" for i in range(n)],
        "amount": rng.lognormal(amount_mu, 0.7, n),
        "channel": rng.choice(["pos", "online", "mobile", "atm"], n, p=[0.5, 0.25, 0.2, 0.05]),
        "score": np.clip(rng.beta(1, 30, n) + score_shift, 0, 1),
        "model_version": "3",
        "latency_ms": 1.0,
        "logged_at": pd.Timestamp(NOW) - pd.to_timedelta(np.arange(n)[::-1], unit="s"),
    })


def _profile(spec) -> m.ReferenceProfile:
    ref = _log(20_000, seed=0)
    return m.build_profile(ref, spec, model_version="3", batch_id="b", scores=ref["score"].to_numpy())


def test_drift_report_flags_the_shifted_column_and_nothing_else(spec):
    report = m.drift_report(_log(5_000, amount_mu=4.4), _profile(spec), T)
    status = {c.name: c.status for c in report.columns}
    assert status == {"amount": "drift", "channel": "ok"}
    assert report.score.status == "ok"
    [reason] = m.retrain_reasons(report, T)
    assert reason.startswith(f"amount PSI {report.columns[0].psi:.3f} > ") and "steady windows" in reason
    assert "| amount | numeric |" in report.to_markdown()


def test_prediction_log_reader_reads_only_new_rows_and_quarantines_broken_files(tmp_path):
    folder, quarantine = tmp_path / "predictions", tmp_path / "quarantine"
    (folder / "v2" / "date=2026-11-20" / "hour=11").mkdir(parents=True)
    log = _log(10)
    log.iloc[:6].to_parquet(folder / "v2" / "date=2026-11-20" / "hour=11" / "a.parquet")
    log.iloc[6:].drop(columns=["logged_at"]).to_parquet(folder / "b.parquet")  # dated by mtime
    (folder / "broken.parquet").write_bytes(b"not parquet")
    read = m.read_prediction_log(folder, quarantine=quarantine)
    assert len(read.frame) == 10
    # Moved aside with its reason, never skipped silently; the next read no longer meets it.
    assert read.quarantined == [str(quarantine / "broken.parquet")]
    assert "broken.parquet" not in os.listdir(folder)
    assert "ArrowInvalid" in (quarantine / "broken.parquet.reason.txt").read_text()
    since = log["logged_at"].iloc[2]
    again = m.read_prediction_log(folder, since=since, quarantine=quarantine)
    assert len(again.frame) == 7 and again.quarantined == []
    assert m.read_prediction_log(tmp_path / "absent").frame.empty
    (folder / "worse.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="worse.parquet"):  # no quarantine given: an error, not a skip
        m.read_prediction_log(folder)


def test_hourly_partitions_before_the_watermark_are_not_listed(tmp_path):
    folder = tmp_path / "predictions"
    old = folder / "v2" / "date=2026-11-20" / "hour=09"
    older = folder / "v2" / "date=2026-11-19" / "hour=23"
    for directory in (old, older):
        directory.mkdir(parents=True)
        (directory / "part.parquet").write_bytes(b"unreadable, but never opened")
    current = folder / "v2" / "date=2026-11-20" / "hour=11"
    current.mkdir(parents=True)
    _log(5).to_parquet(current / "part.parquet")
    read = m.read_prediction_log(folder, since=pd.Timestamp("2026-11-20 10:30", tz="UTC"),
                                 quarantine=tmp_path / "q")
    assert len(read.frame) == 5 and read.quarantined == []


LIKE_WITH_LIKE = {
    "spec_version": 1, "name": "claims",
    "table": {"id": "claim_id", "label": "fraudulent", "positive": "Yes"},
    "columns": {"claim_id": {"dtype": "string"}, "fraudulent": {"dtype": "string", "categories": ["Yes", "No"]},
                "amount": {"dtype": "float64"}, "kind": {"dtype": "string", "categories": ["car", "home", "travel"]}},
    "features": {"numeric": [{"column": "amount", "transform": "log1p"}], "categorical": ["kind"]},
}


def _claims(n: int, seed: int, amount_mu: float = 6.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"claim_id": [f"c{seed}-{i}" for i in range(n)], "fraudulent": "No",
                         "amount": rng.lognormal(amount_mu, 0.8, n),
                         "kind": rng.choice(["car", "home", "travel"], n, p=[0.6, 0.3, 0.1])})


def _served(rows: pd.DataFrame, spec, endpoint: str) -> pd.DataFrame:
    """What the model server logs for these rows: the model inputs, plus the raw columns on /predict."""
    from sluicegate.features.inputs import build_model_input, logged_inputs

    inputs, names = build_model_input(rows, spec), logged_inputs(spec)
    frame = pd.DataFrame(inputs.numeric, columns=names["numeric"]).assign(
        **{n: inputs.categorical[:, j] for j, n in enumerate(names["categorical"])})
    if endpoint == "predict":
        frame = pd.concat([rows[["amount", "kind"]].reset_index(drop=True), frame], axis=1)
    return frame.assign(endpoint=endpoint, score=0.1, logged_at=pd.Timestamp(NOW))


def test_served_rows_of_the_training_distribution_do_not_drift_through_either_endpoint():
    """v2 rows carry model inputs only (log1p(amount), category codes): they are compared with the
    reference's model inputs, never with its raw columns."""
    from sluicegate.features.inputs import build_model_input
    from sluicegate.spec import parse_spec

    spec = parse_spec(LIKE_WITH_LIKE)
    reference = _claims(20_000, seed=0)
    profile = m.build_profile(reference, spec, "1", "b", inputs=build_model_input(reference, spec))
    live = pd.concat([_served(_claims(3_000, seed=1), spec, "v2"), _served(_claims(1_000, seed=2), spec, "predict")],
                     ignore_index=True)
    report = m.drift_report(live, profile, T)
    status = {c.name: c.status for c in report.columns}
    assert status == {"amount": "ok", "kind": "ok", "input.amount": "ok", "input.kind": "ok"}
    assert m.retrain_reasons(report, T) == []

    shifted = pd.concat([_served(_claims(3_000, seed=3, amount_mu=7.0), spec, "v2"),
                         _served(_claims(1_000, seed=4, amount_mu=7.0), spec, "predict")], ignore_index=True)
    drifting = {c.name for c in m.drift_report(shifted, profile, T).columns if c.status == "drift"}
    assert drifting == {"amount", "input.amount"}


def _report(rows: int, amount_psi: float) -> m.DriftReport:
    col = m.ColumnDrift("amount", "numeric", amount_psi, None, "drift" if amount_psi >= 0.25 else "ok")
    return m.DriftReport(rows=rows, since=None, until=None, model_versions=["3"], reference_version="3",
                         columns=[col], score=None)


def test_no_trigger_below_thresholds_or_with_too_little_traffic():
    state = m.MonitorState()
    assert not m.decide_trigger(_report(1_000, 0.05), T, state, NOW).fire
    few = m.decide_trigger(_report(50, 0.9), T, state, NOW)
    assert not few.fire and "min_rows" in few.suppressed


def test_a_crossed_threshold_fires_and_says_why():
    decision = m.decide_trigger(_report(1_000, 0.4), T, m.MonitorState(), NOW)
    assert decision.fire and decision.reasons == ["amount PSI 0.400 >= 0.25"]
    assert decision.key.startswith("sluicegate-drift-v3-")
    assert "retrain triggered: amount PSI 0.400" in decision.summary()


def test_a_flapping_signal_triggers_at_most_once_per_cooldown():
    state = m.MonitorState()
    fired = []
    # Drift on and off every 20 minutes for 13 hours: two cooldowns of 6 h fit, and a bit.
    for step in range(40):
        now = NOW + timedelta(minutes=20 * step)
        decision = m.decide_trigger(_report(1_000, 0.4 if step % 2 == 0 else 0.01), T, state, now)
        if decision.fire:
            m.record_trigger(state, decision, now, flow_run_id=f"run-{step}")
            fired.append(now)
    assert len(fired) == 3
    assert all(b - a >= timedelta(hours=6) for a, b in zip(fired, fired[1:], strict=False))
    assert state.triggers == 3


def test_dedupe_key_and_in_flight_runs_suppress_a_second_trigger():
    state = m.MonitorState()
    first = m.decide_trigger(_report(1_000, 0.4), T, state, NOW)
    m.record_trigger(state, first, NOW, "run-1")
    state.last_trigger_at = None  # even with the cooldown forgotten, the same key does not fire twice
    again = m.decide_trigger(_report(1_000, 0.4), T, state, NOW + timedelta(minutes=1))
    assert not again.fire and "already triggered" in again.suppressed
    busy = m.decide_trigger(_report(1_000, 0.4), T, m.MonitorState(), NOW, active_runs=1)
    assert not busy.fire and "in flight" in busy.suppressed


def test_state_round_trips_under_the_lock(tmp_path):
    path = tmp_path / "monitoring" / "state.json"
    with m.locked_state(path) as state:
        state.last_run_at = "2026-11-20T12:00:00+00:00"
    with m.locked_state(path) as state:
        assert state.last_run_at == "2026-11-20T12:00:00+00:00"


def test_thresholds_come_from_the_drift_block_of_gates_yaml_and_default_without_it(tmp_path):
    from sluicegate.policy import GatePolicyError, load_policy

    base = re.sub(r"(?ms)^drift:.*?(?=^\S|\Z)", "", (REPO / "gates.yaml").read_text())
    gates = tmp_path / "gates.yaml"
    gates.write_text(base + "drift:\n  psi_retrain: 0.3\n  cooldown_hours: 12\n")
    t = load_policy(gates).drift
    assert (t.psi_retrain, t.cooldown_hours, t.psi_warn) == (0.3, 12, 0.1)
    gates.write_text(base)
    assert load_policy(gates).drift == m.DriftThresholds()
    gates.write_text(base + "drift:\n  psi_retrian: 0.3\n")
    with pytest.raises(GatePolicyError, match="psi_retrian"):
        load_policy(gates)


def test_plot_is_written(tmp_path, spec):
    report = m.drift_report(_log(2_000, amount_mu=4.4), _profile(spec), T)
    path = m.plot_drift(report, T, tmp_path / "drift.png")
    assert path.stat().st_size > 1000 and os.path.getsize(path) == path.stat().st_size


def test_logged_times_with_and_without_fractions_and_zones_are_read_as_utc(spec):
    texts = ["2018-10-30T18:08:43.152000+00:00", "2018-10-30T18:08:44+00:00", "2018-10-30T18:08:45",
             "2018-10-30T20:08:46.5+02:00", None]
    frame = m.quality_frame(pd.DataFrame({spec.timestamp: texts}), spec)
    assert frame[spec.timestamp].tolist()[:4] == [pd.Timestamp(t, tz="UTC") for t in (
        "2018-10-30 18:08:43.152", "2018-10-30 18:08:44", "2018-10-30 18:08:45", "2018-10-30 18:08:46.5")]
    assert frame[spec.timestamp].isna().tolist() == [False] * 4 + [True]


def test_category_values_are_one_text_however_they_were_stored():
    cats = ["1", "2", "True", "north"]
    # an int column with a null comes back as floats; numpy and Python bools are the same value
    values = pd.Series([1.0, 2.0, None, np.True_, True, "north", 3], dtype=object)
    shares = m.categorical_shares(values, cats)
    assert shares.tolist() == pytest.approx([1 / 7, 1 / 7, 2 / 7, 1 / 7, 1 / 7, 1 / 7])


def test_rows_the_server_could_not_log_are_counted_once_per_window(tmp_path):
    dead = tmp_path / "_dead_letter"
    dead.mkdir()
    (dead / "dead-1.jsonl").write_text('{"rows": 3}\n{"rows": 2}\n{torn\n')
    now = pd.Timestamp.now(tz="UTC") + pd.Timedelta(seconds=1)
    assert m.unlogged_rows(tmp_path, None, now) == 6
    assert m.unlogged_rows(tmp_path, now, now + pd.Timedelta(hours=1)) == 0


@pytest.mark.parametrize(("positives", "recall", "fires"), [(6, 0.0, False), (20, 0.3, False), (200, 0.3, True),
                                                          (200, 0.45, False), (200, 0.6, False)])
def test_low_live_recall_is_a_retrain_reason_only_beyond_chance(positives, recall, fires):
    """An hour with a handful of positives says little about recall: only a shortfall its exact binomial
    interval (at 1 - false_alarm_rate) excludes calls for a retrain."""
    from sluicegate.operate.labels import LivePerformance

    live = LivePerformance(threshold=0.5, now="2026-10-14T00:00:00+00:00", predictions=1000, labelled=1000,
                           positives=positives, precision=0.8, recall=recall, pr_auc=0.6)
    reason = m.recall_too_low(live, T)
    assert (reason is not None) == fires, reason
    if fires:
        assert f"on {positives:,} positives" in reason and "upper bound" in reason
