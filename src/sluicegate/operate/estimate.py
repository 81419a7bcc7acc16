"""The performance estimate checked like drift: estimate against estimate, per model version.

CBPE (`labels.estimate_performance`) is calibrated on the reference first, as NannyML's CBPE is: an
isotonic map from the version's score to the reference's label rate. Its expected value and band then
come from the reference's steady windows (`operate.steady`) of the live window's row count, span and
hours, each estimated the same way; the band's width is the spread of the metric those windows
realized on their labels (a window's realized figure varies more than its estimate, by the draw of its
labels), so it holds a steady window's realized figure too. A window whose estimate falls below the
band, and at least
`max_estimated_drop` below what such windows expect, is a finding. A 3-hour window is thus compared
with 3-hour windows, never with a whole test set. Rows of several model versions are never pooled under
one threshold: each version is estimated with its own threshold and its own reference. Once labels
arrive, the realized precision and recall of the same rows stand beside the estimate and its band.

NannyML itself installs beside the pins (0.13.1), but brings ~30 packages (xgboost, lightgbm,
nvidia-nccl, gcsfs, s3fs, plotly, a usage-telemetry client) for what is here a few lines of numpy on
the windows the drift check cuts anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from sluicegate.operate import steady
from sluicegate.operate.labels import LivePerformance, estimate_performance, fmt
from sluicegate.operate.monitor import EventWindow, ReferenceProfile

METRICS = ("precision", "recall")


@dataclass
class MetricCheck:
    metric: str
    estimated: float | None
    expected: float | None = None  # mean estimate of the reference's steady windows
    low: float | None = None  # the band's lower edge (a finding below it)
    high: float | None = None
    realized: float | None = None  # on the same rows' labels, once they arrive
    # "ok"; "outside band" (reported); "dropped" (below its band and the allowed drop: a retrain reason)
    status: str = "n/a"

    def summary(self) -> str:
        band = "" if self.low is None else f" (band {self.low:.3f}..{self.high:.3f}, expected {self.expected:.3f})"
        realized = "" if self.realized is None else f", realized {self.realized:.3f}"
        return f"{self.metric} {fmt(self.estimated)}{band}{realized}"


@dataclass
class VersionEstimate:
    model_version: str
    rows: int
    threshold: float
    labelled: int = 0
    calibrated: bool = False  # scores mapped to the reference's label rates before estimating
    how: str = ""  # the reference windows the band comes from
    metrics: list[MetricCheck] = field(default_factory=list)

    def dropped(self) -> list[MetricCheck]:
        return [m for m in self.metrics if m.status == "dropped"]

    def reason(self) -> str | None:
        """A retrain reason when an estimate fell below its band by at least the allowed drop."""
        if not self.dropped():
            return None
        return (f"v{self.model_version}: estimated " + "; ".join(m.summary() for m in self.dropped())
                + f" on {self.rows:,} predictions, below what {self.how} of the reference expect")

    def to_dict(self) -> dict:
        return asdict(self)


def calibrator(profile: ReferenceProfile | None) -> Callable[[np.ndarray], np.ndarray] | None:
    """Score -> probability of the positive class, fitted on the reference's scores and labels."""
    if profile is None or profile.scores is None or profile.labels is None:
        return None
    labels = np.asarray(profile.labels, dtype=float)
    if len(np.unique(labels)) < 2:
        return None
    from sklearn.isotonic import IsotonicRegression

    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(profile.scores, labels)
    return lambda scores: fitted.predict(np.asarray(scores, dtype=float))


def check_version(version: str, scores: np.ndarray, threshold: float, profile: ReferenceProfile | None,
                  window: EventWindow | None, z: float, max_drop: float,
                  realized: LivePerformance | None = None) -> VersionEstimate:
    """One version's rows: the calibrated estimate, its band from the reference's steady windows of the
    same size, and the realized figures where labels arrived."""
    scores = np.asarray(scores, dtype=float)
    calibrate = calibrator(profile)
    estimate = estimate_performance(scores, threshold, calibrate(scores) if calibrate else None)
    out = VersionEstimate(version, estimate.rows, float(threshold), calibrated=calibrate is not None,
                          metrics=[MetricCheck(m, getattr(estimate, m)) for m in METRICS])
    if realized is not None and realized.labelled:
        out.labelled = realized.labelled
        for check in out.metrics:
            check.realized = getattr(realized, check.metric)
    if profile is None or profile.scores is None or not estimate.rows:
        return out
    reference = profile.scores.astype(float)
    probabilities = calibrate(reference) if calibrate else reference
    cut = steady.steady_windows(len(reference), profile.times, estimate.rows, window and window.span,
                                window and window.start)
    out.how = cut.how
    estimates = [estimate_performance(reference[rows], threshold, probabilities[rows]) for rows in cut.rows]
    for check in out.metrics:
        estimated = steady.band([v for e in estimates if (v := getattr(e, check.metric)) is not None])
        bases = [e.expected_tp + e.expected_fp if check.metric == "precision" else e.expected_positives
                 for e in estimates]
        spread = _spread(estimated, _realized_band(profile, reference >= threshold, cut, check.metric), bases)
        _place(check, estimated, spread, z, max_drop)
    return out


def _realized_band(profile: ReferenceProfile, flagged: np.ndarray, cut: steady.Windows,
                   metric: str) -> steady.Band | None:
    """The metric the reference's windows realized on their own labels."""
    if profile.labels is None:
        return None
    positive = np.asarray(profile.labels, dtype=bool)
    values = []
    for rows in cut.rows:
        hits = float((flagged[rows] & positive[rows]).sum())
        base = flagged[rows].sum() if metric == "precision" else positive[rows].sum()
        if base:
            values.append(hits / base)
    return steady.band(values)


def _spread(estimated: steady.Band | None, realized: steady.Band | None, bases: list[float]) -> float:
    """How far a steady window's figure strays: the larger of the estimates' spread, the realized
    figures' spread and the binomial sampling error of a window's realized figure (the reference holds
    few windows of a span, and their spread is itself noisy)."""
    if estimated is None:
        return 0.0
    base = float(np.mean(bases)) if bases else 0.0
    sampling = float(np.sqrt(estimated.mean * (1 - estimated.mean) / base)) if base > 0 else 0.0
    return max(estimated.sd, realized.sd if realized is not None else 0.0, sampling)


def _place(check: MetricCheck, estimated: steady.Band | None, spread: float, z: float, max_drop: float) -> None:
    if estimated is None or check.estimated is None:
        return
    check.expected = estimated.mean
    check.low, check.high = max(0.0, estimated.mean - z * spread), min(1.0, estimated.mean + z * spread)
    if check.low <= check.estimated <= check.high:
        check.status = "ok"
    elif check.estimated < check.low and estimated.mean - check.estimated >= max_drop:
        check.status = "dropped"
    else:
        check.status = "outside band"
