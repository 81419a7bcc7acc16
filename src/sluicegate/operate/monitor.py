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
REFERENCE_ROWS = 50_000  # enough for stable deciles; keeps the reference profile cheap
MISSING = "__missing__"
OTHER = "__other__"


# --- drift statistics ------------------------------------------------------------------------------


def numeric_edges(reference: np.ndarray, bins: int = NUMERIC_BINS) -> np.ndarray:
    """Interior bin edges at the reference's quantiles, fixed once; the outer bins are open."""
    values = reference[np.isfinite(reference)]
    if len(values) == 0:
        return np.array([], dtype=float)
    return np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))


def numeric_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of values per bin (len(edges) + 1 bins), plus a last bin for missing values."""
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    counts = np.bincount(np.searchsorted(edges, values[finite], side="right"), minlength=len(edges) + 1)
    counts = np.append(counts, (~finite).sum()).astype(float)
    return counts / max(counts.sum(), 1.0)


def category_text(value) -> str:
    """One text per category value, however it was stored: 1, 1.0 (an int column with nulls, read
    back) and "1" are "1"; True and numpy's True are "True"."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value.item() if isinstance(value, np.generic) else value)


def categorical_shares(values: pd.Series, categories: list[str]) -> np.ndarray:
    """Share per known category, then one for unseen values and one for missing values."""
    text = values.astype("object")
    missing = text.isna()
    known = text[~missing].map(category_text)
    counts = [float((known == c).sum()) for c in categories]
    counts.append(float((~known.isin(categories)).sum()))
    counts.append(float(missing.sum()))
    counts = np.asarray(counts)
    return counts / max(counts.sum(), 1.0)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index: sum((a - e) * ln(a / e)) over bins, shares floored at EPS."""
    e = np.maximum(np.asarray(expected, dtype=float), EPS)
    a = np.maximum(np.asarray(actual, dtype=float), EPS)
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
    """Bins and shares of the training window, computed once per champion version."""

    model_version: str
    batch_id: str
    rows: int
    columns: list[ColumnProfile]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ReferenceProfile:
        raw = json.loads(text)
        return cls(**{**raw, "columns": [ColumnProfile(**c) for c in raw["columns"]]})


def monitored_columns(spec: DatasetSpec) -> tuple[list[str], list[str]]:
    """(numeric, categorical) columns watched for drift: the raw numeric features, the spec's feature
    columns, the categoricals."""
    raw = [f.column for f in spec.features.numeric_columns]
    return [*raw, *spec.feature_columns], list(spec.categorical_features)


def build_profile(reference: pd.DataFrame, spec: DatasetSpec, model_version: str, batch_id: str,
                  scores: np.ndarray | None = None, inputs: ModelInput | None = None) -> ReferenceProfile:
    """Fix the bins from the reference frame, its model inputs and its scores under the champion."""
    numeric, categorical = monitored_columns(spec)
    columns = []
    for name in numeric:
        if name in reference.columns:
            columns.append(_numeric_profile(name, reference[name].to_numpy(dtype=float, na_value=np.nan), "raw"))
    for name in categorical:
        if name in reference.columns:
            cats = [category_text(c) for c in spec.categories(name)]
            columns.append(ColumnProfile(name, "categorical", categorical_shares(reference[name], cats).tolist(),
                                         categories=cats))
    if inputs is not None:
        names = logged_inputs(spec)
        for j, name in enumerate(names["numeric"]):
            columns.append(_numeric_profile(name, inputs.numeric[:, j].astype(float), "input"))
        for j, (name, column) in enumerate(zip(names["categorical"], spec.categorical_features, strict=True)):
            codes = [str(i) for i in range(len(spec.categories(column)) + 1)]  # 0: unknown or missing
            columns.append(ColumnProfile(name, "categorical", categorical_shares(pd.Series(inputs.categorical[:, j]),
                                                                                 codes).tolist(),
                                         categories=codes, source="input"))
    if scores is not None:
        columns.append(_numeric_profile(SCORE, np.asarray(scores, dtype=float), "input"))
    return ReferenceProfile(model_version=str(model_version), batch_id=batch_id, rows=len(reference),
                            columns=columns)


def _numeric_profile(name: str, values: np.ndarray, source: str) -> ColumnProfile:
    edges = numeric_edges(values)
    return ColumnProfile(name, "numeric", numeric_shares(values, edges).tolist(), edges.tolist(), source=source)


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

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> list[dict]:
        rows = [*self.columns, *([self.score] if self.score else [])]
        return [{"column": c.name, "kind": c.kind, "psi": round(c.psi, 4),
                 "p_value": None if c.p_value is None else round(c.p_value, 4), "status": c.status} for c in rows]

    def to_markdown(self, decision: TriggerDecision | None = None) -> str:
        lines = [f"# Drift report: {self.rows:,} predictions", "",
                 f"Window: {self.since or 'start of log'} .. {self.until}; reference: champion "
                 f"v{self.reference_version}; served by: {', '.join(self.model_versions) or 'unknown'}.", ""]
        if decision is not None:
            lines += [f"**Decision: {decision.summary()}**", ""]
        lines += ["| column | kind | PSI | chi-square p | status |", "|---|---|---:|---:|---|"]
        for r in self.table():
            p = "" if r["p_value"] is None else f"{r['p_value']:.4f}"
            lines.append(f"| {r['column']} | {r['kind']} | {r['psi']:.4f} | {p} | {r['status']} |")
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
        if self.estimated_drop:
            lines += ["", f"**{self.estimated_drop}**"]
        return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _status(value: float, thresholds: DriftThresholds, retrain_at: float) -> str:
    if value >= retrain_at:
        return "drift"
    return "warn" if value >= thresholds.psi_warn else "ok"


def column_drift(profile: ColumnProfile, live: pd.Series, thresholds: DriftThresholds,
                 retrain_at: float) -> ColumnDrift:
    """PSI of one live column against its reference bins; chi-square p too for categoricals."""
    expected = np.asarray(profile.shares)
    if profile.kind == "numeric":
        actual = numeric_shares(live.to_numpy(dtype=float, na_value=np.nan), np.asarray(profile.edges))
        p_value = None
    else:
        actual = categorical_shares(live, profile.categories)
        p_value = chi_square_p(expected, actual * len(live))
    value = psi(expected, actual)
    return ColumnDrift(profile.name, profile.kind, value, p_value, _status(value, thresholds, retrain_at))


def drift_report(log: pd.DataFrame, profile: ReferenceProfile, thresholds: DriftThresholds,
                 since: pd.Timestamp | None = None) -> DriftReport:
    """Drift of every profiled column present in the log, and of the score; a raw column only on the
    rows that carry raw columns."""
    columns, score = [], None
    raw_rows = log[log[ENDPOINT] != TENSORS_ONLY] if ENDPOINT in log.columns else log
    for col in profile.columns:
        rows = raw_rows if col.source == "raw" else log
        if col.name not in rows.columns or rows.empty:
            continue
        if col.name == SCORE:
            score = column_drift(col, rows[SCORE], thresholds, thresholds.score_psi_retrain)
        else:
            columns.append(column_drift(col, rows[col.name], thresholds, thresholds.psi_retrain))
    stamps = pd.to_datetime(log[LOGGED_AT], utc=True) if LOGGED_AT in log.columns and len(log) else None
    versions = sorted(log["model_version"].dropna().astype(str).unique()) if "model_version" in log.columns else []
    return DriftReport(rows=len(log), since=None if since is None else str(since),
                       until=None if stamps is None else str(stamps.max()),
                       model_versions=versions, reference_version=profile.model_version, columns=columns,
                       score=score)


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
    reasons = [f"{c.name} PSI {c.psi:.3f} >= {thresholds.psi_retrain}" for c in report.columns
               if c.psi >= thresholds.psi_retrain]
    if report.score is not None and report.score.psi >= thresholds.score_psi_retrain:
        reasons.append(f"score PSI {report.score.psi:.3f} >= {thresholds.score_psi_retrain}")
    live = report.live
    if live is not None and live.recall is not None and live.recall < thresholds.min_recall:
        reasons.append(f"live recall {live.recall:.3f} < {thresholds.min_recall} on {live.labelled:,} labels")
    if report.estimated_drop:
        reasons.append(report.estimated_drop)
    return reasons


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
