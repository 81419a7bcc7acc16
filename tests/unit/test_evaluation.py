import numpy as np
import pandas as pd
import pytest

from sluicegate.evaluation import (
    choose_threshold,
    classification_metrics,
    expected_calibration_error,
    reliability_table,
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


def test_slices_cover_every_value_with_support(spec):
    frame = pd.DataFrame({"channel": ["pos"] * 300 + ["atm"] * 10, "country": ["US"] * 310})
    y = np.r_[np.tile([0, 1], 150), np.zeros(10)]
    s = np.r_[np.tile([0.2, 0.7], 150), np.full(10, 0.1)]
    rows = slice_metrics(frame, y, s, 0.5, spec)
    by = {(r["slice"], r["value"]): r for r in rows}
    assert by[("channel", "pos")]["support"] == 300 and by[("channel", "pos")]["trusted"]
    assert not by[("channel", "atm")]["trusted"] and by[("country", "US")]["support"] == 310


def test_reliability_table_counts_add_up():
    rng = np.random.default_rng(1)
    s = rng.random(1000)
    table = reliability_table((rng.random(1000) < s).astype(float), s)
    assert sum(r["count"] for r in table) == 1000
