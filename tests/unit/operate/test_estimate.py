"""The performance estimate checked estimate-to-estimate: CBPE calibrated on the reference, its band
from the reference's windows of the same size. On steady traffic the band holds the estimate and the
realized precision and recall, for 3-hour windows and whole days; a model that got worse (its scores
no longer mean what they meant) leaves the band and is a finding."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sluicegate.operate import estimate, steady
from sluicegate.operate.labels import LivePerformance
from sluicegate.operate.monitor import EventWindow, ReferenceProfile

START = pd.Timestamp("2026-10-01", tz="UTC")
THRESHOLD = 0.3
Z = steady.family_z(0.001, 2)


def _world(rows: int, seed: int, start: pd.Timestamp, days: int,
           shift: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(times, scores, labels) of a model whose score is over-confident, about 8% positives; `shift`
    moves the population (fewer positives), not what a score means."""
    rng = np.random.default_rng(seed)
    logit = rng.normal(-3.0 + shift, 1.4, rows)
    labels = rng.random(rows) < 1 / (1 + np.exp(-logit))
    scores = 1 / (1 + np.exp(-2.0 * logit - 2.0))
    times = (start + pd.to_timedelta(np.sort(rng.integers(0, days * 86_400, rows)), unit="s")).to_numpy(
        dtype="datetime64[ns]").astype(np.int64)
    return times, scores, labels


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    times, scores, labels = _world(150_000, 0, START, 14)
    return ReferenceProfile("1", "b", len(scores), [], times=times, scores=scores.astype(np.float32),
                            labels=labels.astype(np.uint8))


def _realized(scores: np.ndarray, labels: np.ndarray) -> LivePerformance:
    flagged = scores >= THRESHOLD
    tp = float((flagged & labels).sum())
    return LivePerformance(THRESHOLD, "", len(scores), len(scores), int(labels.sum()), tp / flagged.sum(),
                           tp / labels.sum(), None)


def _check(profile, times, scores, labels) -> estimate.VersionEstimate:
    window = EventWindow(pd.Timestamp(times.min(), tz="UTC"), pd.Timedelta(int(times.max() - times.min())))
    return estimate.check_version("1", scores, THRESHOLD, profile, window, Z, 0.1, _realized(scores, labels))


@pytest.mark.parametrize("hours", [3, 24])
def test_steady_windows_keep_estimate_and_realized_inside_the_band(profile, hours):
    times, scores, labels = _world(2 * 10_700, 1, START + pd.Timedelta(days=14), 2)
    keys = (times - times[0]) // pd.Timedelta(hours=hours).value
    outside = []
    for key in np.unique(keys):
        inside = keys == key
        check = _check(profile, times[inside], scores[inside], labels[inside])
        assert check.calibrated and "reference windows of" in check.how
        for m in check.metrics:
            assert m.status == "ok", (key, m.summary())
            if not m.low <= m.realized <= m.high:
                outside.append((key, m.summary()))
    assert outside == []


def test_calibration_on_the_reference_brings_the_estimate_to_the_realized_figure(profile):
    times, scores, labels = _world(10_700, 2, START + pd.Timedelta(days=14), 1)
    check = _check(profile, times, scores, labels)
    raw = estimate.check_version("1", scores, THRESHOLD, None, None, Z, 0.1, _realized(scores, labels))
    for calibrated, uncalibrated in zip(check.metrics, raw.metrics, strict=True):
        assert abs(calibrated.estimated - calibrated.realized) < 0.04, calibrated.summary()
        assert abs(uncalibrated.estimated - uncalibrated.realized) > 0.1, uncalibrated.summary()


def test_a_population_the_model_does_worse_on_leaves_the_band_and_says_so(profile):
    """A population with fewer likely positives: fewer of the positives are flagged, and the estimate
    sees it before any label (3 hours of traffic)."""
    times, scores, labels = _world(1_340, 3, START + pd.Timedelta(days=14, hours=9), 1, shift=-1.0)
    check = _check(profile, (times - times[0]) // 8 + times[0], scores, labels)
    recall = {m.metric: m for m in check.metrics}["recall"]
    assert recall.status == "dropped", check.metrics
    assert check.reason().startswith("v1: estimated recall") and "band" in check.reason()
    assert recall.realized < recall.expected  # the labels, once in, agree
