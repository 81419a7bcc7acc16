import numpy as np
import pandas as pd
import pytest

from sluicegate.features.inputs import MISSING, build_model_input, numeric_inputs
from sluicegate.runtime import ModelInput
from sluicegate.ship.evaluate import (
    ROWS,
    Comparison,
    average_precision,
    behaviour,
    choose_threshold,
    classification_metrics,
    compare_with_champion,
    expected_calibration_error,
    paired_bootstrap,
    plot_reliability,
    reliability_table,
    resampling_blocks,
    robustness,
    slice_confidence,
    slice_groups,
    slice_metrics,
)


def test_perfectly_calibrated_scores_have_near_zero_ece():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(200_000) < p).astype(float)
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, np.clip(p + 0.2, 0, 1)) > 0.15


def test_metrics_on_known_case():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.6, 0.4, 0.9])
    m = classification_metrics(y, s, threshold=0.5)
    assert m["roc_auc"] == pytest.approx(0.75)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)


def test_threshold_maximizes_f1():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    t = choose_threshold(y, s)
    assert 0.3 < t <= 0.8
    assert classification_metrics(y, s, t)["f1"] == 1.0


def test_slices_cover_every_value_with_support():
    groups = {"channel": np.array(["pos"] * 300 + ["atm"] * 10)}
    y = np.r_[np.tile([0, 1], 150), np.zeros(10)]
    s = np.r_[np.tile([0.2, 0.7], 150), np.full(10, 0.1)]
    rows = slice_metrics(groups, y, s, 0.5)
    by = {(r["slice"], r["value"]): r for r in rows}
    assert by[("channel", "pos")]["support"] == 300 and by[("channel", "pos")]["trusted"]
    assert not by[("channel", "atm")]["trusted"] and by[("channel", "atm")]["positives"] == 0


def test_slice_groups_from_the_spec(spec):
    frame = pd.DataFrame({"channel": ["pos", "atm", "pos"], "country": ["US", "GB", "US"],
                          "amount": [10.0, 150.0, 900.0]})
    names = numeric_inputs(spec)
    numeric = np.zeros((3, len(names)), np.float32)
    numeric[1:, names.index("cust_amount_mean_7d" + MISSING)] = 1.0  # no history: new
    groups = slice_groups(frame, ModelInput(numeric, np.zeros((3, 4), np.int64)), spec)
    assert list(groups["amount_band"]) == ["<25", "100-500", ">=500"]
    assert list(groups["customer_history"]) == ["returning", "new", "new"]
    assert list(groups["channel"]) == ["pos", "atm", "pos"]


def test_average_precision_matches_sklearn():
    from sklearn.metrics import average_precision_score
    rng = np.random.default_rng(3)
    y = (rng.random(5000) < 0.05).astype(float)
    s = np.round(rng.random(5000) + y * 0.3, 2)  # ties on purpose
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_paired_bootstrap_interval_contains_the_difference():
    rng = np.random.default_rng(4)
    y = (rng.random(8000) < 0.1).astype(float)
    a = y * 0.5 + rng.random(8000)
    comp = paired_bootstrap(y, a, a + y * 0.3, samples=200, confidence=0.95)
    assert comp.diff > 0 and comp.ci_low <= comp.diff <= comp.ci_high and comp.ci_low > 0
    same = paired_bootstrap(y, a, a, samples=100, confidence=0.95)
    assert same.diff == 0 and same.ci_low == 0 == same.ci_high


def _rows(spec, n, rng):
    frame = pd.DataFrame({
        "amount": rng.gamma(2.0, 30.0, n),
        spec.timestamp: pd.Timestamp("2026-10-01", tz="UTC") + pd.to_timedelta(rng.uniform(0, 86400, n), unit="s"),
        **{c: rng.choice(spec.categories(c), n) for c in spec.categorical_features},
        **{name: rng.gamma(1.0, 2.0, n) for name in spec.feature_columns},
    })
    frame["cust_txn_count_1h"] = rng.poisson(1.0, n).astype(float)
    return frame


def test_robustness_and_behaviour_of_a_velocity_model(spec):
    """A model of velocity alone: losing history hurts it, a shuffled category does not, and its score
    rises with velocity (no direction violation) and ignores a tiny change of amount (invariant)."""
    rng = np.random.default_rng(5)
    frame = _rows(spec, 6000, rng)
    vel = numeric_inputs(spec).index("cust_txn_count_1h")

    def score(x):
        return 1 / (1 + np.exp(-(3 * x.numeric[:, vel] - 4)))

    inputs = build_model_input(frame, spec)
    y = (rng.random(len(frame)) < score(inputs)).astype(float)
    base = average_precision(y, score(inputs))
    rob = robustness(score, inputs, y, base, spec)
    assert rob.drops["no_history"] > 0.01  # the model depends on velocity
    assert abs(rob.drops["shuffled_merchant_category"]) < 1e-9  # and not on the category
    beh = behaviour(lambda f: score(build_model_input(f, spec)), frame, spec)
    velocity = next(c for c in beh.checks if c["what"].startswith("cust_txn_count_1h"))
    invariance = next(c for c in beh.checks if c["kind"] == "invariance")
    assert beh.violation_rate == 0 and velocity["mean_delta"] > 0
    assert invariance["max_abs_delta"] == 0


def test_a_model_that_lowers_risk_with_velocity_breaks_the_direction_check(spec):
    rng = np.random.default_rng(6)
    frame = _rows(spec, 2000, rng)
    vel = numeric_inputs(spec).index("cust_txn_count_1h")

    def backwards(f):
        return 1 / (1 + np.exp(3 * build_model_input(f, spec).numeric[:, vel] - 1))

    assert behaviour(backwards, frame, spec).violation_rate > 0.5


def test_reliability_plot_is_written(tmp_path):
    rng = np.random.default_rng(1)
    s = rng.random(1000)
    table = reliability_table((rng.random(1000) < s).astype(float), s)
    path = plot_reliability(table, 0.01, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reliability_table_counts_add_up():
    rng = np.random.default_rng(1)
    s = rng.random(1000)
    table = reliability_table((rng.random(1000) < s).astype(float), s)
    assert sum(r["count"] for r in table) == 1000


def _clustered(rng, clusters, size=50):
    """Labels and two scorers whose difference varies by cluster (as rows of one customer or one day do)."""
    effect = rng.normal(0, 1.5, clusters)
    block = np.repeat(np.arange(clusters), size)
    y = (rng.random(len(block)) < 0.1).astype(float)
    champion = y + rng.normal(0, 1, len(y))
    challenger = y * (1.3 + effect[block]) + rng.normal(0, 1, len(y))
    return y, champion, challenger, block


def test_block_bootstrap_covers_a_known_difference_at_its_stated_level():
    """The difference over a million rows is the truth; 100 windows of 50 clusters each: the interval that
    resamples clusters holds it about 90% of the time, the one that resamples rows far less often."""
    y, a, b, _ = _clustered(np.random.default_rng(0), 25_000, 40)
    truth = average_precision(y, b) - average_precision(y, a)
    hits = {"rows": 0, "blocks": 0}
    for rep in range(100):
        y, a, b, block = _clustered(np.random.default_rng(100 + rep), 50)
        for kind, blocks in (("rows", None), ("blocks", block)):
            c = paired_bootstrap(y, a, b, 100, 0.9, seed=rep, blocks=blocks, unit="cluster")
            hits[kind] += c.ci_low <= truth <= c.ci_high
    assert 0.84 <= hits["blocks"] / 100 <= 0.96, hits
    assert hits["rows"] / 100 <= 0.8, hits
    assert c.resampled == "cluster (50 blocks)"


def test_resampling_unit_is_the_coarsest_that_leaves_enough_blocks(spec):
    rng = np.random.default_rng(6)
    keys = {name: entity.key for name, entity in spec.entities.items()}
    fine, coarse = list(keys)[:2]
    n = 3000
    frame = pd.DataFrame({keys[fine]: rng.integers(0, 1000, n), keys[coarse]: rng.integers(0, 40, n),
                          spec.timestamp: pd.Timestamp("2026-10-01", tz="UTC")
                          + pd.to_timedelta(rng.uniform(0, 2 * 86400, n), unit="s")})
    unit, blocks = resampling_blocks(frame, spec)
    assert unit == f"entity {coarse}" and len(np.unique(blocks)) == 40  # two days are too few blocks
    frame[keys[coarse]] = rng.integers(0, 5, n)
    assert resampling_blocks(frame, spec)[0] == f"entity {fine}"
    assert resampling_blocks(frame.drop(columns=list(keys.values())), spec) == (ROWS, None)


def test_slice_intervals_are_corrected_for_the_number_of_slices():
    assert slice_confidence(0.95, 10, "not_shown_worse") == pytest.approx(0.995)
    assert slice_confidence(0.95, 10, "non_inferiority") == 0.95  # every slice must pass: no correction
    rng = np.random.default_rng(7)
    y = (rng.random(6000) < 0.1).astype(float)
    a = y * 0.5 + rng.random(6000)
    groups = {"g": np.repeat(np.arange(6), 1000).astype(str)}
    comps = compare_with_champion(y, a, a + y * 0.2, groups, 100, 0.95, 500, 20)
    assert comps[0].confidence == 0.95 and [c.confidence for c in comps[1:]] == [pytest.approx(1 - 0.05 / 6)] * 6


def test_the_two_tests_differ_on_a_noisy_challenger():
    noisy = Comparison("overall", 1000, 50, 0.5, 0.49, -0.01, -0.06, 0.04)
    assert noisy.passes(0.02, "not_shown_worse")  # not shown worse
    assert not noisy.passes(0.02, "non_inferiority")  # nor shown within the margin
