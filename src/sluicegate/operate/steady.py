"""What a steady world looks like: the reference cut into windows like the live one.

A live window's PSI is never 0: it holds fewer rows than the reference (sampling noise) and, when
short, only some hours of the day (three hours of traffic hold three hours of the day, the reference
all of them). Both are normal variation. As NannyML does, the reference itself is cut into windows of
the live window's time span (at two offsets; without a timestamp, random draws), each cut to the live
window's row count, and every statistic is computed on each of them: their spread is the band a steady
world stays in. An alert level sits above that band, at a family-wise false-alarm rate: with m columns
watched, each column's level is the mean plus z standard deviations of its steady windows with
z = Phi^-1(1 - rate / m) (Bonferroni), and never below the largest steady window's value, so one
retrain decision over thirty columns is not thirty coin flips.

Plain numpy; `operate.monitor` applies the levels to PSI, `operate.labels` to the CBPE estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

EPS = 1e-4  # the same floor on a bin's share as the monitor's PSI
PRIOR = 0.5  # counts added to every bin before a window's shares are taken (Jeffreys): an empty bin of a
# small window otherwise weighs (e - EPS) * ln(e / EPS), 0.69 for a decile, more than most real shifts
MIN_WINDOW_ROWS = 30  # a shorter reference window says more about its own noise than about the world
MIN_WINDOWS = 12  # fewer windows of the span than this: random draws of the row count instead
RANDOM_WINDOWS = 100
SEED = 0


@dataclass(frozen=True)
class Band:
    """A statistic on the steady windows of the reference."""

    mean: float
    sd: float
    low: float  # smallest steady window's value
    high: float  # largest steady window's value
    windows: int
    skewed: bool = False  # never negative (PSI): its tail is a gamma's, not a normal's

    def upper(self, z: float) -> float:
        """Above the largest steady value and the normal's z-quantile; for a skewed statistic at the
        same quantile of a gamma with its mean: a steady window's PSI is a scaled chi-square (sampling
        noise), a gamma of shape (bins - 1) / 2, at least 1; a smaller shape fitted to the windows'
        spread would be the heavier tail of a few odd windows, which the largest value covers."""
        levels = [self.mean + z * self.sd, self.high]
        if self.skewed and self.mean > 0 and self.sd > 0:
            from scipy.stats import gamma, norm

            shape = max((self.mean / self.sd) ** 2, 1.0)
            scale = self.mean / shape
            levels.append(float(gamma.ppf(norm.cdf(z), shape, scale=scale)))
        return max(levels)

    def lower(self, z: float) -> float:
        return min(self.mean - z * self.sd, self.low)


@dataclass(frozen=True)
class Windows:
    """Row indices into the reference, one array per steady window, and how they were cut."""

    rows: list[np.ndarray]
    how: str  # e.g. "112 reference windows of 3h (~1,000 rows each)"


def family_z(rate: float, tests: int) -> float:
    """The one-sided normal quantile that keeps the chance of any false alarm over `tests` at `rate`."""
    from scipy.stats import norm

    return float(norm.ppf(1 - rate / max(tests, 1)))


def steady_windows(total: int, times: np.ndarray | None, rows: int, span: pd.Timedelta | None,
                   start: pd.Timestamp | None = None, seed: int = SEED) -> Windows:
    """Windows of a reference of `total` rows like a live one of `rows` rows over `span`: consecutive
    spans of the reference (sorted by time) at offsets 0 and span/2, the partial first and last left
    out, each cut to `rows` rows at random; of them, those starting within an hour (or half the span)
    of the live window's `start` in the day, where there are enough (an evening is compared with
    evenings); without times or span, or when the reference holds too few such windows, random draws of `rows` rows."""
    rng = np.random.default_rng(seed)
    if times is not None and span is not None and span > pd.Timedelta(0) and len(times):
        cut, starts = _time_windows(np.asarray(times, dtype=np.int64), span.value, rows, rng)
        same = _same_hours(starts, start, span) if start is not None else None
        hours = ""
        if same is not None and same.sum() >= MIN_WINDOWS:
            cut, hours = [w for w, keep in zip(cut, same, strict=True) if keep], f" starting near {start:%H:%M}"
        if len(cut) >= MIN_WINDOWS:
            sizes = int(np.median([len(w) for w in cut]))
            return Windows(cut, f"{len(cut)} reference windows of {_span(span)}{hours} (~{sizes:,} rows each)")
    return random_windows(total, rows, rng)


def random_windows(total: int, rows: int, rng: np.random.Generator | None = None) -> Windows:
    rng = rng or np.random.default_rng(SEED)
    size = min(rows, total)
    draws = [np.sort(rng.choice(total, size=size, replace=False)) for _ in range(RANDOM_WINDOWS)] if size else []
    return Windows(draws, f"{len(draws)} random draws of {size:,} reference rows")


def _time_windows(times: np.ndarray, step: int, rows: int,
                  rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """The windows (row indices) and each one's start time (ns)."""
    order = np.argsort(times, kind="stable")
    ordered = times[order]
    out, starts = [], []
    for offset in (0, step // 2):
        keys = (ordered - ordered[0] + offset) // step
        for key in np.unique(keys)[1:-1]:
            chunk = order[keys == key]
            if len(chunk) >= MIN_WINDOW_ROWS:
                out.append(np.sort(rng.choice(chunk, size=rows, replace=False)) if len(chunk) > rows else chunk)
                starts.append(ordered[0] - offset + key * step)
    return out, np.asarray(starts, dtype=np.int64)


def _same_hours(starts: np.ndarray, start: pd.Timestamp, span: pd.Timedelta) -> np.ndarray | None:
    """Which windows start at about the live window's time of day; None when the span is a day or more."""
    day = pd.Timedelta(days=1).value
    if span.value >= day:
        return None
    near = max(pd.Timedelta(hours=1).value, span.value // 2)
    gap = np.abs((starts - start.value) % day)
    return np.minimum(gap, day - gap) <= near


def _span(span: pd.Timedelta) -> str:
    hours = span / pd.Timedelta(hours=1)
    return f"{hours:.3g}h" if hours >= 1 else f"{span / pd.Timedelta(minutes=1):.3g}min"


def window_psi(codes: np.ndarray, expected: np.ndarray, windows: Windows) -> np.ndarray:
    """PSI of each window's bin shares (codes: one bin index per reference row) against `expected`."""
    bins = len(expected)
    e = np.maximum(np.asarray(expected, dtype=float), EPS)
    out = np.empty(len(windows.rows))
    for i, rows in enumerate(windows.rows):
        a = np.maximum(smoothed(np.bincount(codes[rows], minlength=bins)[:bins]), EPS)
        out[i] = np.sum((a - e) * np.log(a / e))
    return out


def smoothed(counts: np.ndarray) -> np.ndarray:
    """A window's shares from its bin counts, with PRIOR added to each bin."""
    counts = np.asarray(counts, dtype=float) + PRIOR
    return counts / counts.sum()


def band(values: np.ndarray, skewed: bool = False) -> Band | None:
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < 2:
        return None
    return Band(float(values.mean()), float(values.std(ddof=1)), float(values.min()), float(values.max()),
                len(values), skewed=skewed)
