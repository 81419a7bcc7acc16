"""Live-traffic monitoring: drift against the training reference, data quality,
late-label precision and recall, and the retrain trigger with cooldown and dedupe.

Plain functions and dataclasses; `flows/monitor.py` wires them to Prefect and MLflow.

The prediction log this module reads: parquet files anywhere under the table's predictions
folder, in hourly partitions (`<endpoint>/date=YYYY-MM-DD/hour=HH/`, which the model server writes)
or not; one row per scored row, holding the model's inputs as `input.<name>` columns, and, where the
request carried them (/predict, or a log of your own), the spec's raw columns and feature columns;
`score` (float probability), `model_version` (str), `latency_ms` (float) and `logged_at` (UTC
timestamp). `probability` is read as `score` and `ts` as `logged_at` when those are absent. Missing
columns are tolerated; a file without either time column is dated by its modification time; an
unreadable file is moved to quarantine and counted in the report, never skipped silently.

Like is compared with like: the reference profile holds both representations of the champion's
training window (raw columns and model inputs), and a raw column is compared only on the rows that
carry raw columns (v2 requests carry tensors alone).

Late labels (`sluicegate labels`, see `operate.labels`) are joined to the log by id for live
precision, recall and PR-AUC; before they arrive, CBPE estimates precision and recall from the scores.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from sluicegate.config import file_lock
from sluicegate.data.batches import quarantine_file
from sluicegate.features.inputs import logged_inputs
from sluicegate.operate import steady
from sluicegate.operate.labels import LivePerformance, PerformanceEstimate, utc_times
from sluicegate.policy import DriftThresholds
from sluicegate.runtime import ModelInput
from sluicegate.serve.predlog import DEAD_LETTER, RAW_PREFIX
from sluicegate.spec import DatasetSpec

LOG_COLUMNS = ("score", "model_version", "latency_ms", "logged_at")
# Other names a prediction log may use for the same columns (the model server's own log writes these).
LOG_ALIASES = {"probability": "score", "ts": "logged_at"}
SCORE = "score"
LOGGED_AT = "logged_at"
ENDPOINT = "endpoint"
TENSORS_ONLY = "v2"  # the endpoint whose rows hold model inputs but no raw columns
EPS = 1e-4  # floor on a bin's share, so an empty bin gives a large but finite PSI
NUMERIC_BINS = 10  # reference deciles
# Enough for stable deciles and for steady windows as full as a live hour of a busy table (the demo's
# training window holds ~140k rows: an hour of it ~200).
REFERENCE_ROWS = 200_000
WARN_Z = 2.0  # a column is reported (never acted on) above its steady windows' mean + 2 sd
MISSING = "__missing__"
OTHER = "__other__"


# --- drift statistics ------------------------------------------------------------------------------


def numeric_edges(reference: np.ndarray, bins: int = NUMERIC_BINS) -> np.ndarray:
    """Interior bin edges at the reference's quantiles, fixed once; the outer bins are open."""
    values = reference[np.isfinite(reference)]
    if len(values) == 0:
        return np.array([], dtype=float)
    return np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))


def numeric_codes(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Each value's bin (len(edges) + 1 bins), then len(edges) + 1 for a missing value."""
    values = np.asarray(values, dtype=float)
    codes = np.searchsorted(edges, np.where(np.isfinite(values), values, 0.0), side="right")
    return np.where(np.isfinite(values), codes, len(edges) + 1)


def numeric_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of values per bin (len(edges) + 1 bins), plus a last bin for missing values."""
    return _shares(numeric_codes(values, edges), len(edges) + 2)


def _shares(codes: np.ndarray, bins: int) -> np.ndarray:
    counts = np.bincount(codes, minlength=bins).astype(float)
    return counts / max(counts.sum(), 1.0)


def category_text(value) -> str:
    """One text per category value, however it was stored: 1, 1.0 (an int column with nulls, read
    back) and "1" are "1"; True and numpy's True are "True"."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value.item() if isinstance(value, np.generic) else value)


def categorical_codes(values: pd.Series, categories: list[str]) -> np.ndarray:
    """Each value's category index, then len(categories) for an unseen value, + 1 for a missing one."""
    text = pd.Series(values).astype("object")
    missing = text.isna().to_numpy()
    index = {c: i for i, c in enumerate(categories)}
    codes = np.full(len(text), len(categories) + 1, dtype=np.int64)
    codes[~missing] = [index.get(category_text(v), len(categories)) for v in text[~missing]]
    return codes


def categorical_shares(values: pd.Series, categories: list[str]) -> np.ndarray:
    """Share per known category, then one for unseen values and one for missing values."""
    return _shares(categorical_codes(values, categories), len(categories) + 2)


def psi(expected: np.ndarray, actual: np.ndarray, rows: int | None = None) -> float:
    """Population stability index: sum((a - e) * ln(a / e)) over bins, shares floored at EPS. Given the
    live `rows`, the live shares are smoothed first (`steady.smoothed`), so that one bin a small window
    happens to leave empty does not weigh like a shift."""
    e = np.maximum(np.asarray(expected, dtype=float), EPS)
    a = np.asarray(actual, dtype=float)
    a = np.maximum(a if rows is None else steady.smoothed(a * rows), EPS)
    return float(np.sum((a - e) * np.log(a / e)))


def chi_square_p(expected_shares: np.ndarray, actual_counts: np.ndarray) -> float:
    """p-value of a chi-square goodness-of-fit of the live counts to the reference shares."""
    from scipy.stats import chisquare

    keep = np.asarray(expected_shares) > 0
    observed = np.asarray(actual_counts, dtype=float)
    if observed[~keep].sum() > 0:  # a category the reference never saw: certainly not the same
        return 0.0
    observed, expected = observed[keep], np.asarray(expected_shares)[keep]
    if len(observed) < 2 or observed.sum() == 0:
        return 1.0
    return float(chisquare(observed, expected / expected.sum() * observed.sum()).pvalue)


# --- the reference profile -------------------------------------------------------------------------


@dataclass
class ColumnProfile:
    name: str
    kind: str  # "numeric" or "categorical"
    shares: list[float]
    edges: list[float] = field(default_factory=list)  # numeric only
    categories: list[str] = field(default_factory=list)  # categorical only
    source: str = "raw"  # "raw": a column of the table or a feature; "input": a model-input column


@dataclass
class ReferenceProfile:
    """Bins and shares of the training window, computed once per champion version; and, to cut the
    reference into steady windows (`operate.steady`), each reference row's bin per column (`codes`),
    its time and its score (arrays kept beside the JSON, see `save`)."""

    model_version: str
    batch_id: str
    rows: int
    columns: list[ColumnProfile]
    codes: np.ndarray | None = field(default=None, repr=False)  # rows x columns, in `columns` order
    times: np.ndarray | None = field(default=None, repr=False)  # event time (ns) per row; None: no timestamp
    scores: np.ndarray | None = field(default=None, repr=False)  # the champion's score per row
    labels: np.ndarray | None = field(default=None, repr=False)  # 1 where the row's label is positive

    def to_json(self) -> str:
        return json.dumps({"model_version": self.model_version, "batch_id": self.batch_id, "rows": self.rows,
                           "columns": [asdict(c) for c in self.columns]})

    @classmethod
    def from_json(cls, text: str) -> ReferenceProfile:
        raw = json.loads(text)
        return cls(**{**raw, "columns": [ColumnProfile(**c) for c in raw["columns"]]})

    def save(self, path: Path) -> None:
        """The JSON at path, the arrays beside it (.npz); each written aside and renamed."""
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: v for k, v in (("codes", self.codes), ("times", self.times), ("scores", self.scores),
                                    ("labels", self.labels)) if v is not None}
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path.with_suffix(".npz"))
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ReferenceProfile:
        profile = cls.from_json(path.read_text())
        arrays = path.with_suffix(".npz")
        if arrays.exists():
            with np.load(arrays) as saved:
                profile.codes, profile.times, profile.scores, profile.labels = (
                    saved[k] if k in saved else None for k in ("codes", "times", "scores", "labels"))
        return profile

    def column_codes(self, name: str) -> np.ndarray | None:
        if self.codes is None:
            return None
        index = [c.name for c in self.columns].index(name)
        return self.codes[:, index]


def monitored_columns(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    """(numeric, categorical) columns watched for drift: the raw numeric features, the spec's feature
    columns, the categoricals."""
    raw = [f.column for f in spec.features.numeric_columns]
    return [*raw, *spec.feature_columns], list(spec.categorical_features)


def build_profile(reference: pd.DataFrame, spec: DatasetSpec, model_version: str, batch_id: str,
                  scores: np.ndarray | None = None, inputs: ModelInput | None = None) -> ReferenceProfile:
    """Fix the bins from the reference frame, its model inputs and its scores under the champion."""
    numeric, categorical = monitored_columns(spec)
    columns, codes = [], []
    for name in numeric:
        if name in reference.columns:
            _add(columns, codes, *_numeric_profile(name, reference[name].to_numpy(dtype=float, na_value=np.nan),
                                                   "raw"))
    for name in categorical:
        if name in reference.columns:
            cats = [category_text(c) for c in spec.categories(name)]
            _add(columns, codes, *_categorical_profile(name, reference[name], cats, "raw"))
    if inputs is not None:
        names = logged_inputs(spec)
        for j, name in enumerate(names["numeric"]):
            _add(columns, codes, *_numeric_profile(name, inputs.numeric[:, j].astype(float), "input"))
        for j, (name, column) in enumerate(zip(names["categorical"], spec.categorical_features, strict=True)):
            cats = [str(i) for i in range(len(spec.categories(column)) + 1)]  # 0: unknown or missing
            _add(columns, codes, *_categorical_profile(name, pd.Series(inputs.categorical[:, j]), cats, "input"))
    if scores is not None:
        _add(columns, codes, *_numeric_profile(SCORE, np.asarray(scores, dtype=float), "input"))
    times = None
    if spec.timestamp and spec.timestamp in reference.columns:
        times = utc_times(reference[spec.timestamp]).to_numpy(dtype="datetime64[ns]").astype(np.int64)
    labels = spec.positive(reference[spec.label]).to_numpy(dtype=np.uint8) if spec.label in reference.columns else None
    return ReferenceProfile(model_version=str(model_version), batch_id=batch_id, rows=len(reference),
                            columns=columns, codes=np.stack(codes, axis=1).astype(np.uint16) if codes else None,
                            times=times, scores=None if scores is None else np.asarray(scores, dtype=np.float32),
                            labels=labels)


def _add(columns: list, codes: list, profile: ColumnProfile, column_codes: np.ndarray) -> None:
    columns.append(profile)
    codes.append(column_codes)


def _numeric_profile(name: str, values: np.ndarray, source: str) -> tuple[ColumnProfile, np.ndarray]:
    edges = numeric_edges(values)
    codes = numeric_codes(values, edges)
    return ColumnProfile(name, "numeric", _shares(codes, len(edges) + 2).tolist(), edges.tolist(),
                         source=source), codes


def _categorical_profile(name: str, values: pd.Series, categories: list[str],
                         source: str) -> tuple[ColumnProfile, np.ndarray]:
    codes = categorical_codes(values, categories)
    return ColumnProfile(name, "categorical", _shares(codes, len(categories) + 2).tolist(),
                         categories=categories, source=source), codes


def reference_rows(batch: pd.DataFrame, spec: DatasetSpec, window: tuple[pd.Timestamp, pd.Timestamp] | None,
                   rows: int = REFERENCE_ROWS, seed: int = 0) -> pd.DataFrame:
    """Raw rows of the training window (a sample of at most `rows`), in time order. Without a
    timestamp there is no window: the whole batch is the reference."""
    ts = spec.timestamp
    frame = batch
    if ts and window is not None:
        when = utc_times(frame[ts])
        frame = frame[(when >= window[0]) & (when <= window[1])]
    if len(frame) > rows:
        frame = frame.sample(rows, random_state=seed)
    return frame.sort_values(ts, kind="stable").reset_index(drop=True) if ts else frame.reset_index(drop=True)


def parse_window(text: str | None) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """The registry's `train_window` tag, 'YYYY-MM-DD HH:MM .. YYYY-MM-DD HH:MM', as UTC bounds."""
    if not text or ".." not in text:
        return None
    start, end = (pd.Timestamp(p.strip(), tz="UTC") for p in text.split(".."))
    return start, end + pd.Timedelta(minutes=1)  # the tag is floored to the minute


# --- the drift report ------------------------------------------------------------------------------


@dataclass
class ColumnDrift:
    name: str
    kind: str
    psi: float
    p_value: float | None
    status: str  # "ok", "warn" or "drift"
    expected: float | None = None  # mean PSI of the reference's steady windows like the live one
    alert_at: float | None = None  # the PSI from which it is drift
    why: str = ""  # why it is or is not an alarm, in words


@dataclass
class DriftReport:
    rows: int
    since: str | None
    until: str | None
    model_versions: list[str]
    reference_version: str
    columns: list[ColumnDrift]
    score: ColumnDrift | None
    quality_passed: bool | None = None
    quality_failures: list[str] = field(default_factory=list)
    live: LivePerformance | None = None  # measured on the late labels that have arrived
    estimate: PerformanceEstimate | None = None  # CBPE: expected from the scores alone
    estimated_drop: str | None = None  # the estimate fell too far below the champion's test figures
    quarantined: list[str] = field(default_factory=list)  # log or label files that could not be read
    unlogged: int = 0  # rows the server answered but could not log (its dead-letter folder)
    calibration: str | None = None  # how the alert levels were found (the steady windows)
    estimates: list[dict] = field(default_factory=list)  # per model version, see operate.estimate
    skew: dict | None = None  # served rows against their landed rows' offline inputs (operate.skew)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> list[dict]:
        rows = [*self.columns, *([self.score] if self.score else [])]
        return [{"column": c.name, "kind": c.kind, "psi": round(c.psi, 4), "expected": _round(c.expected),
                 "alert_at": _round(c.alert_at), "p_value": _round(c.p_value), "status": c.status, "why": c.why}
                for c in rows]

    def to_markdown(self, decision: TriggerDecision | None = None) -> str:
        lines = [f"# Drift report: {self.rows:,} predictions", "",
                 f"Window: {self.since or 'start of log'} .. {self.until}; reference: champion "
                 f"v{self.reference_version}; served by: {', '.join(self.model_versions) or 'unknown'}.", ""]
        if decision is not None:
            lines += [f"**Decision: {decision.summary()}**", ""]
        if self.calibration:
            lines += [f"Alert levels: {self.calibration}.", ""]
        lines += ["| column | kind | PSI | steady mean | alert at | chi-square p | status | why |",
                  "|---|---|---:|---:|---:|---:|---|---|"]
        for r in self.table():
            cells = [_cell(r[k]) for k in ("psi", "expected", "alert_at", "p_value")]
            lines.append(f"| {r['column']} | {r['kind']} | {' | '.join(cells)} | {r['status']} | {r['why']} |")
        lines.append("")
        if self.unlogged:
            lines += [f"**{self.unlogged:,} rows the server answered could not be logged** (its dead-letter "
                      "folder); they are in no figure above.", ""]
        if self.quarantined:
            lines += [f"**{len(self.quarantined)} unreadable log file(s) moved to quarantine:** "
                      + ", ".join(self.quarantined), ""]
        if self.quality_passed is not None:
            verdict = "passed" if self.quality_passed else "FAILED: " + "; ".join(self.quality_failures)
            lines += [f"Data quality (GX suite): {verdict}", ""]
        if self.live is None or self.live.labelled == 0:
            lines.append("Live precision/recall: no late labels yet.")
        else:
            lines.append(self.live.summary() + ".")
        if self.estimate is not None:
            lines += ["", f"Estimated before labels ({self.estimate.summary()})."]
        lines += _estimate_lines(self.estimates)
        if self.estimated_drop:
            lines += ["", f"**{self.estimated_drop}**"]
        if self.skew is not None:
            loud = "**" if self.skew["skewed"] else ""
            lines += ["", f"{loud}Skew in production: {self.skew['detail']}{loud}"]
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _estimate_lines(estimates: list[dict]) -> list[str]:
    """Per model version: the estimate, what the reference's windows of this size expect, its band, and
    the realized figure once labels arrive."""
    if not estimates:
        return []
    lines = ["", "| version | rows | metric | estimated | expected | band | realized | status |",
             "|---|---:|---|---:|---:|---|---:|---|"]
    for version in estimates:
        for m in version["metrics"]:
            band = "" if m["low"] is None else f"{m['low']:.3f}..{m['high']:.3f}"
            realized = "" if m["realized"] is None else f"{m['realized']:.3f} ({version['labelled']:,} labelled)"
            lines.append(f"| v{version['model_version']} | {version['rows']:,} | {m['metric']} | "
                         f"{_fmt(m['estimated'])} | {_fmt(m['expected'])} | {band} | {realized} | {m['status']} |")
    hows = sorted({v["how"] for v in estimates if v["how"]})
    return lines + (["", f"Bands from {'; '.join(hows)}."] if hows else [])


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


@dataclass(frozen=True)
class Levels:
    """A column's warn and alert PSI, and the steady band they come from (None: fixed levels only)."""

    warn: float
    alert: float
    band: steady.Band | None = None


def levels(band: steady.Band | None, thresholds: DriftThresholds, retrain_at: float, z: float) -> Levels:
    """Above the steady band (alert: at the family-wise z), never below gates.yaml's fixed levels, which
    say how much change is worth a retrain at all."""
    if band is None:
        return Levels(thresholds.psi_warn, retrain_at)
    return Levels(max(thresholds.psi_warn, band.upper(WARN_Z)), max(retrain_at, band.upper(z)), band)


def column_drift(profile: ColumnProfile, live: pd.Series, thresholds: DriftThresholds,
                 retrain_at: float, at: Levels | None = None) -> ColumnDrift:
    """PSI of one live column against its reference bins, against its levels (default: the fixed ones);
    chi-square p too for categoricals."""
    expected = np.asarray(profile.shares)
    if profile.kind == "numeric":
        actual = numeric_shares(live.to_numpy(dtype=float, na_value=np.nan), np.asarray(profile.edges))
        p_value = None
    else:
        actual = categorical_shares(live, profile.categories)
        p_value = chi_square_p(expected, actual * len(live))
    value = psi(expected, actual, len(live))
    at = at or Levels(thresholds.psi_warn, retrain_at)
    # Above, not at: a steady window's value is the alert level itself when it is the largest of them.
    status = "drift" if value > at.alert else "warn" if value > at.warn else "ok"
    return ColumnDrift(profile.name, profile.kind, value, p_value, status,
                       None if at.band is None else at.band.mean, at.alert, _why(value, status, at))


def _why(value: float, status: str, at: Levels) -> str:
    if at.band is None:
        return f"fixed levels: warn {at.warn:g}, alert {at.alert:g}"
    band = f"steady windows {at.band.mean:.3f} +- {at.band.sd:.3f}, up to {at.band.high:.3f}"
    if status == "drift":
        return f"{value:.3f} is above every steady window and the alert level {at.alert:.3f} ({band})"
    if status == "warn":
        return f"{value:.3f} is high for a steady window but below the alert level {at.alert:.3f} ({band})"
    return f"within steady variation ({band}); alert at {at.alert:.3f}"


def drift_report(log: pd.DataFrame, profile: ReferenceProfile, thresholds: DriftThresholds,
                 since: pd.Timestamp | None = None, window: EventWindow | None = None) -> DriftReport:
    """Drift of every profiled column present in the log, and of the score; a raw column only on the
    rows that carry raw columns. Each column's levels are calibrated on the reference's steady windows
    of the log's row count and of its events' `window` (`operate.steady`), with the false-alarm rate shared by all
    the columns compared; a profile without row codes has the fixed levels only."""
    raw_rows = log[log[ENDPOINT] != TENSORS_ONLY] if ENDPOINT in log.columns else log
    compared = [(col, rows) for col in profile.columns
                for rows in [raw_rows if col.source == "raw" else log] if col.name in rows.columns and not rows.empty]
    z = steady.family_z(thresholds.false_alarm_rate, len(compared))
    cuts: dict[int, steady.Windows] = {}  # one cut of the reference per row count compared
    columns, score = [], None
    for col, rows in compared:
        retrain_at = thresholds.score_psi_retrain if col.name == SCORE else thresholds.psi_retrain
        at = levels(_steady_band(profile, col, len(rows), window, cuts), thresholds, retrain_at, z)
        drift = column_drift(col, rows[col.name], thresholds, retrain_at, at)
        if col.name == SCORE:
            score = drift
        else:
            columns.append(drift)
    stamps = pd.to_datetime(log[LOGGED_AT], utc=True) if LOGGED_AT in log.columns and len(log) else None
    versions = sorted(log["model_version"].dropna().astype(str).unique()) if "model_version" in log.columns else []
    calibration = None
    if cuts:
        calibration = (f"{'; '.join(w.how for w in cuts.values())}; a false-alarm rate of "
                       f"{thresholds.false_alarm_rate:g} over {len(compared)} columns (z = {z:.2f})")
    return DriftReport(rows=len(log), since=None if since is None else str(since),
                       until=None if stamps is None else str(stamps.max()),
                       model_versions=versions, reference_version=profile.model_version, columns=columns,
                       score=score, calibration=calibration)


def _steady_band(profile: ReferenceProfile, col: ColumnProfile, rows: int, window: EventWindow | None,
                 cuts: dict[int, steady.Windows]) -> steady.Band | None:
    codes = profile.column_codes(col.name)
    if codes is None:
        return None
    if rows not in cuts:
        cuts[rows] = steady.steady_windows(len(codes), profile.times, rows, window and window.span,
                                           window and window.start)
    return steady.band(steady.window_psi(codes, np.asarray(col.shares), cuts[rows]), skewed=True)


@dataclass(frozen=True)
class EventWindow:
    """When the window's events happened: the reference's steady windows are cut to its span, and
    taken from the same hours of the day."""

    start: pd.Timestamp
    span: pd.Timedelta


def event_window(log: pd.DataFrame, spec: DatasetSpec) -> EventWindow | None:
    """By the table's own timestamp where the log holds it (a replay's events span hours its log time
    does not), else by when the rows were logged; None for fewer than two times."""
    for name in (spec.timestamp, LOGGED_AT):
        if name and name in log.columns:
            times = utc_times(log[name]).dropna()
            if len(times) > 1:
                return EventWindow(times.min(), times.max() - times.min())
    return None


# --- reading the logs ------------------------------------------------------------------------------


@dataclass
class LogRead:
    frame: pd.DataFrame
    quarantined: list[str]  # files that could not be read, as moved to quarantine


def read_prediction_log(folder: Path, since: pd.Timestamp | None = None,
                        quarantine: Path | None = None) -> LogRead:
    """Rows logged strictly after `since`, oldest first, from the parquet files under folder; hourly
    partitions that ended before `since` are not even listed. An unreadable file is moved under
    `quarantine` (with a .reason.txt beside it) and named in the result."""
    frames, quarantined = [], []
    for path in _log_files(folder, since):
        mtime = pd.Timestamp(path.stat().st_mtime, unit="s", tz="UTC")
        if since is not None and mtime <= since:
            continue  # not written since the last run: nothing new in it
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # a broken file must not stop monitoring, nor vanish unseen
            quarantined.append(str(_quarantine(path, folder, quarantine, exc)))
            continue
        frame = _own_names(frame)
        if LOGGED_AT not in frame.columns:
            frame[LOGGED_AT] = mtime
        frames.append(frame)
    if not frames:
        return LogRead(pd.DataFrame(columns=list(LOG_COLUMNS)), quarantined)
    log = pd.concat(frames, ignore_index=True)
    log[LOGGED_AT] = utc_times(log[LOGGED_AT])
    if since is not None:
        log = log[log[LOGGED_AT] > since]
    return LogRead(log.sort_values(LOGGED_AT, kind="stable").reset_index(drop=True), quarantined)


def unlogged_rows(folder: Path, after: pd.Timestamp | None, until: pd.Timestamp) -> int:
    """Rows the model server answered but could not log: its dead-letter files under folder written
    after `after` and at or before `until`, one JSON line per model call with its `rows`."""
    dead = folder / DEAD_LETTER
    total = 0
    for path in sorted(dead.glob("*.jsonl")) if dead.exists() else []:
        written = pd.Timestamp(path.stat().st_mtime, unit="s", tz="UTC")
        if (after is None or written > after) and written <= until:
            total += sum(_dead_rows(line) for line in path.read_text().splitlines() if line.strip())
    return total


def _dead_rows(line: str) -> int:
    try:
        return int(json.loads(line).get("rows", 1))
    except (ValueError, TypeError, AttributeError):  # a torn line still stands for at least one row
        return 1


def _own_names(frame: pd.DataFrame) -> pd.DataFrame:
    """The log's columns under the monitor's names, then a request field the server wrote aside
    (`raw.<name>`: a table's own `ts`, say) under its own name."""
    aliases = {k: v for k, v in LOG_ALIASES.items() if k in frame.columns and v not in frame.columns}
    frame = frame.rename(columns=aliases)
    raw = {c: c.removeprefix(RAW_PREFIX) for c in frame.columns if str(c).startswith(RAW_PREFIX)}
    return frame.rename(columns={k: v for k, v in raw.items() if v not in frame.columns})


def _log_files(folder: Path, since: pd.Timestamp | None) -> list[Path]:
    """Parquet files under folder, skipping `date=`/`hour=` partitions wholly before `since`."""
    if not folder.exists():
        return []
    files, todo = [], [(folder, None)]
    while todo:
        directory, day = todo.pop()
        for entry in directory.iterdir():
            if entry.is_dir():
                entry_day = entry.name.removeprefix("date=") if entry.name.startswith("date=") else day
                if not _partition_before(entry.name, entry_day, since):
                    todo.append((entry, entry_day))
            elif entry.suffix == ".parquet" and not entry.name.startswith("."):
                files.append(entry)
    return sorted(files)


def _partition_before(name: str, day: str | None, since: pd.Timestamp | None) -> bool:
    """Whether a `date=`/`hour=` folder holds only rows logged before `since`."""
    if since is None or day is None:
        return False
    since_day = f"{since:%Y-%m-%d}"
    if name.startswith("date="):
        return day < since_day
    if name.startswith("hour="):
        return day == since_day and int(name.removeprefix("hour=")) < since.hour
    return False


def _quarantine(path: Path, folder: Path, quarantine: Path | None, exc: Exception) -> Path:
    if quarantine is None:
        raise ValueError(f"cannot read prediction log file {path}: {exc}") from exc
    return quarantine_file(path, quarantine / path.relative_to(folder), f"{type(exc).__name__}: {exc}")


def quality_frame(log: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """The log's raw columns in spec order, for the GX suite; a missing label is filled in as 0
    so the frame has the suite's columns (label checks are then ignored, see quality_failures)."""
    frame = pd.DataFrame({name: log[name] if name in log.columns else pd.Series([None] * len(log), dtype=object)
                          for name in spec.column_names})
    if spec.label not in log.columns:
        frame[spec.label] = np.zeros(len(log), dtype="int64")
    if spec.timestamp:
        frame[spec.timestamp] = utc_times(frame[spec.timestamp])
    return frame


def quality_failures(report_failures: list, log: pd.DataFrame, spec: DatasetSpec) -> list[str]:
    """The GX failures that concern live traffic; label and id checks only count when the log holds them."""
    # Not sent with the traffic: the label (late), the id (optional, kept as the request's id).
    ignore = {name for name in (spec.label, spec.id) if name not in log.columns}
    return [f"{f.column or 'table'}: {f.expectation} ({f.detail})" for f in report_failures
            if f.column not in ignore]


# --- the trigger -----------------------------------------------------------------------------------


@dataclass
class MonitorState:
    """What the monitor remembers between runs (a JSON file under SLUICEGATE_HOME/monitoring)."""

    last_run_at: str | None = None  # watermark: newest logged_at already read
    last_trigger_at: str | None = None
    last_trigger_key: str | None = None
    last_flow_run_id: str | None = None
    triggers: int = 0
    unlogged_until: str | None = None  # watermark of the dead-letter files already counted
    skew_checked: dict[str, float] = field(default_factory=dict)  # landed partition -> write time checked

    @classmethod
    def load(cls, path: Path) -> MonitorState:
        text = path.read_text() if path.exists() else ""
        return cls(**json.loads(text)) if text.strip() else cls()

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(path)


@contextmanager
def locked_state(path: Path) -> Iterator[MonitorState]:
    """Hold an exclusive lock while deciding and recording, so two monitors never both trigger."""
    with file_lock(path.with_suffix(".lock")):
        state = MonitorState.load(path)
        yield state
        state.save(path)


@dataclass
class TriggerDecision:
    fire: bool
    reasons: list[str]  # why retraining is warranted (empty: it is not)
    suppressed: str | None = None  # why it does not fire although warranted
    key: str | None = None  # the dedupe key of this trigger

    def summary(self) -> str:
        if self.fire:
            return "retrain triggered: " + "; ".join(self.reasons)
        if self.reasons:
            return f"retrain warranted ({'; '.join(self.reasons)}) but suppressed: {self.suppressed}"
        return "no retrain: " + (self.suppressed or "no threshold crossed")


def retrain_reasons(report: DriftReport, thresholds: DriftThresholds) -> list[str]:
    """Every crossed threshold, said in words."""
    reasons = [_drift_reason(c, thresholds.psi_retrain) for c in report.columns if c.status == "drift"]
    if report.score is not None and report.score.status == "drift":
        reasons.append(_drift_reason(report.score, thresholds.score_psi_retrain))
    if (low := recall_too_low(report.live, thresholds)) is not None:
        reasons.append(low)
    if report.estimated_drop:
        reasons.append(report.estimated_drop)
    return reasons


def recall_too_low(live: LivePerformance | None, thresholds: DriftThresholds) -> str | None:
    """Live recall below `min_recall` beyond chance: the exact binomial interval of the caught share of
    the window's positives, at 1 - `false_alarm_rate`, lies wholly below it. An hour with 6 positives
    and none caught is not evidence (its 99.9% upper bound is 0.72): on steady traffic such hours
    called for a retrain 10 times in 24 when the bare recall was compared."""
    if live is None or live.recall is None or not live.positives or live.recall >= thresholds.min_recall:
        return None
    from scipy.stats import binomtest

    caught = round(live.recall * live.positives)
    level = 1 - thresholds.false_alarm_rate
    high = binomtest(caught, live.positives).proportion_ci(level, method="exact").high
    if high >= thresholds.min_recall:
        return None
    return (f"live recall {live.recall:.3f} < {thresholds.min_recall} on {live.positives:,} positives of "
            f"{live.labelled:,} labels ({level:.1%} upper bound {high:.3f})")


def _drift_reason(column: ColumnDrift, fixed: float) -> str:
    if column.alert_at is None or column.expected is None:
        return f"{column.name} PSI {column.psi:.3f} >= {fixed}"
    return (f"{column.name} PSI {column.psi:.3f} > {column.alert_at:.3f} (steady windows of the reference: "
            f"mean {column.expected:.3f})")


def dedupe_key(reference_version: str, now: datetime, cooldown_hours: float) -> str:
    """Same champion, same cooldown slot: same key, so the API refuses a second run for it."""
    slot = 0 if cooldown_hours <= 0 else math.floor(now.timestamp() / (cooldown_hours * 3600))
    digest = hashlib.sha256(f"{reference_version}:{slot}".encode()).hexdigest()[:12]
    return f"sluicegate-drift-v{reference_version}-{digest}"


def decide_trigger(report: DriftReport, thresholds: DriftThresholds, state: MonitorState, now: datetime,
                   active_runs: int = 0) -> TriggerDecision:
    """Fire when a threshold is crossed, unless too little traffic, a run in flight, or the cooldown."""
    if report.rows < thresholds.min_rows:
        return TriggerDecision(False, [], f"only {report.rows:,} rows, fewer than min_rows={thresholds.min_rows}")
    reasons = retrain_reasons(report, thresholds)
    if not reasons:
        return TriggerDecision(False, [])
    key = dedupe_key(report.reference_version, now, thresholds.cooldown_hours)
    if active_runs > 0:
        return TriggerDecision(False, reasons, f"{active_runs} triggered training run(s) still in flight", key)
    if state.last_trigger_key == key:
        return TriggerDecision(False, reasons, f"already triggered for this champion and slot ({key})", key)
    if state.last_trigger_at is not None:
        last = datetime.fromisoformat(state.last_trigger_at)
        ready = last + timedelta(hours=thresholds.cooldown_hours)
        if now < ready:
            return TriggerDecision(False, reasons, f"cooldown: last retrain triggered at {last:%Y-%m-%d %H:%M} UTC, "
                                                   f"next allowed after {ready:%Y-%m-%d %H:%M} UTC", key)
    return TriggerDecision(True, reasons, None, key)


def record_trigger(state: MonitorState, decision: TriggerDecision, now: datetime, flow_run_id: str | None) -> None:
    state.last_trigger_at = now.astimezone(UTC).isoformat()
    state.last_trigger_key = decision.key
    state.last_flow_run_id = flow_run_id
    state.triggers += 1


# --- plots -----------------------------------------------------------------------------------------


def plot_drift(report: DriftReport, thresholds: DriftThresholds, path: Path) -> Path:
    """A bar chart of PSI per column with the warn and retrain lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.table()
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(rows) + 1.5))
    colors = {"ok": "#4c9f70", "warn": "#e0a100", "drift": "#c0392b"}
    ax.barh([r["column"] for r in rows], [r["psi"] for r in rows], color=[colors[r["status"]] for r in rows])
    calibrated = [r for r in rows if r["alert_at"] is not None]  # each column's own alert level
    ax.scatter([r["alert_at"] for r in calibrated], [r["column"] for r in calibrated], marker="|", s=200,
               color="#c0392b", label="column's alert level")
    ax.axvline(thresholds.psi_warn, color="#e0a100", linestyle="--", label=f"warn {thresholds.psi_warn}")
    ax.axvline(thresholds.psi_retrain, color="#c0392b", linestyle="--", label=f"retrain {thresholds.psi_retrain}")
    ax.set_xlabel("PSI vs. training reference")
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
