"""Labels that arrive late: import them, read them back, measure the champion on them, and
estimate its precision and recall before they arrive (CBPE).

Plain pandas, numpy and scikit-learn; no Prefect, no MLflow. `sluicegate labels` wires it up;
the monitor may use `estimated_drop` as a retrain reason.

The folder format (`SLUICEGATE_HOME/tables/<spec>/labels/`), one file per import:

    labels/labelled_date=YYYY-MM-DD/labels-<YYYYMMDDTHHMMSSZ>-<hash8>.parquet

with exactly three columns: the spec's id column, its label column and `labelled_at` (UTC, when the
label became known). The date and the timestamp are those of the import (`now`), `hash8` the first
8 hex digits of the imported file's SHA-256. Files are written to a temporary name and renamed, so a
reader never sees half a file. A file under `labels/` that cannot be read, or lacks the id or label
column, is moved to `quarantine/labels/` with a `.reason.txt` beside it by `read_labels`.

When the spec's id is personal data (`pii: true`), the prediction log holds its token (`serve.privacy`):
`read_labels` returns each label's id as the same token, so labels meet their predictions by token.
The files keep the id as imported (the operator's own data; `table.retention` deletes them).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from sluicegate.data.batches import quarantine_file
from sluicegate.runtime import sha256_file
from sluicegate.serve import privacy
from sluicegate.serve.privacy import Pseudonyms
from sluicegate.spec import DatasetSpec, duration

LABELLED_AT = "labelled_at"
REQUEST_ID = "request_id"
SCORE_COLUMNS = ("score", "probability")  # the first present is the model's probability
TIME_COLUMNS = ("logged_at", "ts")  # the first present is when the prediction was made
MATURITIES = ("1d", "7d", "30d")
QUARANTINE_FOLDER = "labels"
SHOWN_VALUES = 10  # bad label values listed in an error, at most


class LabelError(ValueError):
    """A label file that cannot be imported as it is; the message names the file and the column."""


@dataclass(frozen=True)
class LabelImport:
    rows: int  # labels written
    path: Path  # the file written under labels_dir
    duplicates: int  # rows dropped because a later row of the file had the same id

    def summary(self) -> str:
        dupes = (f"; {self.duplicates:,} duplicate id(s) in the file, the last row of each kept"
                 if self.duplicates else "")
        return f"labels: {self.rows:,} labels -> {self.path}{dupes}"


@dataclass(frozen=True)
class QuarantinedFile:
    source: Path  # where it was under labels_dir
    path: Path  # where it is now, under quarantine_dir/labels/
    reason: str


# --- import ----------------------------------------------------------------------------------------


def utc_times(values: pd.Series) -> pd.Series:
    """Times as UTC, whatever their text: with or without fractions of seconds, with or without a zone
    (none: UTC), mixed in one column; a typed column as it is."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return pd.to_datetime(values, utc=True)
    try:
        return pd.to_datetime(values, utc=True, format="ISO8601")
    except (ValueError, TypeError):  # not ISO 8601 (e.g. "12/04/2026 10:00"): element by element
        return pd.to_datetime(values, utc=True, format="mixed")


def _utc(now: datetime | pd.Timestamp) -> pd.Timestamp:
    stamp = pd.Timestamp(now)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _read_table(path: Path, spec: DatasetSpec) -> pd.DataFrame:
    if not path.exists():
        raise LabelError(f"{path} not found")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if suffix in (".csv", ".txt"):
            # a string id keeps its leading zeros; everything else as pandas infers it
            as_text = {spec.id: "string"} if spec.all_columns[spec.id].dtype == "string" else None
            return pd.read_csv(path, dtype=as_text)
    except Exception as exc:
        raise LabelError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    raise LabelError(f"{path}: read CSV (.csv) or parquet (.parquet) label files, not {suffix or 'no suffix'}")


def _norm(value) -> str | None:
    """A comparable form of a label value, so 1, 1.0 and "1" (or True and "true") are the same value."""
    if not isinstance(value, str):
        return None if value is None or pd.isna(value) else privacy.canonical(value)
    text = value.strip()
    return text.lower() if text.lower() in ("true", "false") else text


def _show(value) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "null"
    return repr(value.item() if isinstance(value, np.generic) else value)


def _check_labels(values: pd.Series, spec: DatasetSpec, where: Path) -> pd.Series:
    """The label values as the spec's values; refuses nulls and, when the label declares its categories,
    any value that is neither one of them nor the positive value."""
    name = spec.label
    allowed = list(spec.categories(name))
    if allowed:
        allowed.append(spec.table.positive)
    canonical = {_norm(v): v for v in allowed}
    normed = values.map(_norm)
    bad = normed.isna() | (~normed.isin(list(canonical)) if canonical else False)
    if bad.any():
        counts = values[bad].astype(object).map(_show).value_counts()
        listed = ", ".join(f"{v} ({n:,} row{'s' if n > 1 else ''})" for v, n in counts.head(SHOWN_VALUES).items())
        more = f" and {len(counts) - SHOWN_VALUES} more" if len(counts) > SHOWN_VALUES else ""
        expected = (f"neither the positive value {spec.table.positive!r} nor another of the label's categories "
                    f"{spec.categories(name)}" if canonical else "missing")
        raise LabelError(f"{where}: column {name!r}: {int(bad.sum()):,} label value(s) {expected}: {listed}{more}")
    if not canonical:
        return values
    out = pd.Series([canonical[n] for n in normed], index=values.index)
    dtype = spec.all_columns[name].dtype
    return out.astype(str) if dtype == "string" else out.astype({"int64": "int64", "float64": "float64",
                                                                  "bool": "bool"}.get(dtype, object))


def _check_ids(values: pd.Series, spec: DatasetSpec, where: Path) -> pd.Series:
    missing = int(values.isna().sum())
    if missing:
        raise LabelError(f"{where}: column {spec.id!r}: {missing:,} row(s) have no id; a label without an id "
                         "cannot be matched to a prediction")
    if spec.all_columns[spec.id].dtype == "string":
        return values.astype(str)
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any() or not (numbers == np.floor(numbers)).all():
        bad = values[numbers.isna() | (numbers != np.floor(numbers))].head(SHOWN_VALUES).tolist()
        raise LabelError(f"{where}: column {spec.id!r}: ids must be integers (the spec's id is int64), "
                         f"found {bad}")
    return numbers.astype("int64")


def import_labels(table_path: Path, spec: DatasetSpec, labels_dir: Path, now: datetime) -> LabelImport:
    """Check a CSV or parquet file of late labels and write it as one file in the folder format.

    The file holds the spec's id and label columns, and optionally `labelled_at` (missing, or a
    missing value: `now`; a time without a zone is UTC); other columns are ignored. Refused with a
    LabelError naming the file and the column: no rows, a missing id or label column, ids that are
    missing (or not integers for an int64 id), missing labels, and, when the spec declares the
    label's categories, values that are neither the positive value nor one of them (listed with
    their counts), an unreadable `labelled_at`. Repeated ids keep the file's last row. The input
    file is only read.
    """
    table_path, now = Path(table_path), _utc(now)
    frame = _read_table(table_path, spec)
    for column in (spec.id, spec.label):
        if column not in frame.columns:
            kind = "id" if column == spec.id else "label"
            raise LabelError(f"{table_path}: no column {column!r} (the spec's {kind}); the file has "
                             f"{', '.join(map(str, frame.columns)) or 'no columns'}")
    if frame.empty:
        raise LabelError(f"{table_path}: holds no rows, so no labels to import")
    ids = _check_ids(frame[spec.id], spec, table_path)
    values = _check_labels(frame[spec.label], spec, table_path)
    if LABELLED_AT in frame.columns:
        try:
            labelled = utc_times(frame[LABELLED_AT])
        except (ValueError, TypeError) as exc:
            raise LabelError(f"{table_path}: column {LABELLED_AT!r} is not a timestamp ({exc})") from None
        labelled = labelled.fillna(now)
    else:
        labelled = pd.Series(now, index=frame.index)
    out = pd.DataFrame({spec.id: ids, spec.label: values, LABELLED_AT: labelled.astype("datetime64[us, UTC]")})
    keep = ~out[spec.id].duplicated(keep="last")
    duplicates = int((~keep).sum())
    out = out[keep].reset_index(drop=True)
    folder = Path(labels_dir) / f"labelled_date={now:%Y-%m-%d}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"labels-{now:%Y%m%dT%H%M%SZ}-{sha256_file(table_path)[:8]}.parquet"
    tmp = folder / f".{path.name}.tmp"  # not *.parquet: no reader picks it up half written
    out.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return LabelImport(rows=len(out), path=path, duplicates=duplicates)


# --- reading back ----------------------------------------------------------------------------------


def _quarantine(path: Path, labels_dir: Path, quarantine_dir: Path, reason: str) -> Path:
    base = "__".join(path.relative_to(labels_dir).parts)  # keeps the partition in the name
    return quarantine_file(path, Path(quarantine_dir) / QUARANTINE_FOLDER / base, reason)


def read_labels(labels_dir: Path, spec: DatasetSpec, quarantine_dir: Path,
                tokens: Pseudonyms | None = None) -> tuple[pd.DataFrame, list[QuarantinedFile]]:
    """Every label file (`**/*.parquet`) under labels_dir, as one frame of id, label and `labelled_at`
    (a file without `labelled_at`: its modification time).

    A file that cannot be read, or lacks the id or label column, is moved to
    `quarantine_dir/labels/` with `<name>.reason.txt` beside it, and returned in the list: no file is
    skipped silently. Rows are all returned; `live_performance` keeps the newest label of an id. A pii
    id is returned as its token under `tokens` (the home's, `serve.privacy.pseudonyms`), as the log has it.
    """
    hashed = spec.table.id in spec.pii_columns
    if hashed and tokens is None:
        raise ValueError(f"columns.{spec.id}.pii: the id is personal data, so labels meet predictions by its "
                         "token: read_labels needs the home's tokens")
    labels_dir, quarantine_dir = Path(labels_dir), Path(quarantine_dir)
    frames, quarantined = [], []
    for path in sorted(labels_dir.rglob("*.parquet")) if labels_dir.exists() else []:
        if path.resolve().is_relative_to(quarantine_dir.resolve()):
            continue  # a quarantine folder inside labels_dir: what it holds was refused already
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:
            reason = f"unreadable: {type(exc).__name__}: {exc}"
        else:
            lacking = [c for c in (spec.id, spec.label) if c not in frame.columns]
            if not lacking:
                if LABELLED_AT not in frame.columns:
                    frame[LABELLED_AT] = pd.Timestamp(path.stat().st_mtime, unit="s", tz="UTC")
                frame = frame[[spec.id, spec.label, LABELLED_AT]].copy()
                frame[LABELLED_AT] = utc_times(frame[LABELLED_AT])
                if hashed:
                    frame[spec.id] = pd.Series(tokens.tokens(frame[spec.id]), index=frame.index, dtype="string")
                frames.append(frame)
                continue
            reason = f"lacks the column(s) {lacking} (has {list(frame.columns)})"
        quarantined.append(QuarantinedFile(path, _quarantine(path, labels_dir, quarantine_dir, reason), reason))
    if not frames:
        return pd.DataFrame({spec.id: [], spec.label: [], LABELLED_AT: pd.Series([], dtype="datetime64[us, UTC]")}), \
            quarantined
    return pd.concat(frames, ignore_index=True), quarantined


# --- measured performance --------------------------------------------------------------------------


@dataclass
class LivePerformance:
    threshold: float
    now: str
    predictions: int  # predictions logged at or before now (one per id)
    labelled: int  # of them, with a label known at now
    positives: int
    precision: float | None  # None: nothing flagged
    recall: float | None  # None: no positive label
    pr_auc: float | None  # None: labels of one class only
    buckets: list[dict] = field(default_factory=list)  # the same per maturity, see live_performance

    def rows(self) -> list[dict]:
        """One row for all labelled predictions, then one per maturity bucket."""
        overall = {"maturity": "all", "predictions": self.predictions, "labelled": self.labelled,
                   "coverage": self.labelled / self.predictions if self.predictions else None,
                   "positives": self.positives, "precision": self.precision, "recall": self.recall,
                   "pr_auc": self.pr_auc}
        return [overall, *self.buckets]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"live: {self.labelled:,} of {self.predictions:,} predictions labelled ({self.positives:,} positive) "
                f"at threshold {self.threshold:g}: precision {fmt(self.precision)}, recall {fmt(self.recall)}, "
                f"PR-AUC {fmt(self.pr_auc)}")


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _keys(values: pd.Series) -> pd.Series:
    """Join keys as text, so an int id logged as "42" meets the label 42 (and 42.0)."""
    if pd.api.types.is_float_dtype(values):
        whole = values.dropna()
        if (whole == np.floor(whole)).all():
            values = values.astype("Int64")
    return values.astype("string")


def _first(frame: pd.DataFrame, names: Iterable[str], what: str) -> str:
    for name in names:
        if name in frame.columns:
            return name
    raise ValueError(f"the prediction log has no {what} column (looked for {', '.join(names)}; "
                     f"it has {', '.join(map(str, frame.columns))})")


def _prediction_frame(log: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """key, score and time of each logged prediction."""
    if spec.id in log.columns:
        key = _keys(log[spec.id])
        if REQUEST_ID in log.columns:  # a row logged without the id column's value: the id the caller sent
            key = key.fillna(_keys(log[REQUEST_ID]))
    elif REQUEST_ID in log.columns:
        key = _keys(log[REQUEST_ID])
    else:
        raise ValueError(f"the prediction log has neither the spec's id column {spec.id!r} nor {REQUEST_ID!r}")
    score = log[_first(log, SCORE_COLUMNS, "score")].astype(float)
    at = utc_times(log[_first(log, TIME_COLUMNS, "time")])
    return pd.DataFrame({"key": key, "score": score, "at": at})


def _metrics(score: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    from sklearn.metrics import average_precision_score

    flagged = score >= threshold
    tp = int((flagged & (y == 1)).sum())
    both = 0 < int(y.sum()) < len(y)
    return {"labelled": len(y), "positives": int(y.sum()),
            "precision": tp / int(flagged.sum()) if flagged.any() else None,
            "recall": tp / int(y.sum()) if y.any() else None,
            "pr_auc": float(average_precision_score(y, score)) if both else None}


def labelled_predictions(log: pd.DataFrame, labels: pd.DataFrame, spec: DatasetSpec,
                         now: datetime) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the predictions as of now: key, score, at, one per id, the last logged; those of them whose label
    is known at now, with `y` 1.0 for the positive class). Labels stamped after now are not known yet;
    an id's newest label counts."""
    now = _utc(now)
    preds = _prediction_frame(log, spec) if len(log) else pd.DataFrame(
        {"key": pd.Series([], dtype="string"), "score": pd.Series([], dtype=float),
         "at": pd.Series([], dtype="datetime64[ns, UTC]")})
    preds = preds[preds["key"].notna() & preds["score"].notna() & (preds["at"] <= now)]
    preds = preds.sort_values("at", kind="stable").drop_duplicates("key", keep="last")
    if len(labels):
        stamps = (utc_times(labels[LABELLED_AT]) if LABELLED_AT in labels.columns
                  else pd.Series(pd.NaT, index=labels.index, dtype="datetime64[ns, UTC]"))
        known = pd.DataFrame({"key": _keys(labels[spec.id]), "y": spec.positive(labels[spec.label]).to_numpy(),
                              "labelled_at": stamps})
        known = known[known["labelled_at"].isna() | (known["labelled_at"] <= now)]
        known = known.sort_values("labelled_at", kind="stable", na_position="first").drop_duplicates(
            "key", keep="last")
        joined = preds.merge(known[["key", "y"]], on="key", how="inner")
    else:
        joined = preds.assign(y=pd.Series([], dtype=float)).iloc[:0]
    return preds.reset_index(drop=True), joined.reset_index(drop=True)


def live_performance(log: pd.DataFrame, labels: pd.DataFrame, spec: DatasetSpec, threshold: float, now: datetime,
                     maturities: Iterable[str] = MATURITIES) -> LivePerformance:
    """Precision and recall at `threshold`, and PR-AUC (sklearn's average precision), of the logged
    predictions whose label has arrived, overall and per label maturity.

    The log: the prediction's id under the spec's id column or `request_id` (the spec's column is
    preferred; a row where it is missing uses `request_id`), its probability under `score` or
    `probability`, its time under `logged_at` or `ts`. Point in time: only predictions logged at or
    before `now` and labels with `labelled_at` at or before `now` (or none) count. An id predicted
    twice counts once, with its last prediction; an id labelled twice, with its newest label.

    Maturity m (a duration such as "7d"): the bucket of predictions whose age at `now` is at least m,
    i.e. logged at or before `now - m`, so their labels have had at least m to arrive. The buckets are
    nested (every 30d prediction is in the 7d bucket too), not disjoint. Each bucket gives
    `predictions` (how many are that old), `labelled`, `coverage` (labelled / predictions), positives,
    precision, recall and PR-AUC on its labelled rows. The overall figures take every labelled
    prediction whatever its age; young ones are labelled mostly when their label came quickly, which
    is why the mature buckets are the fairer measure.
    """
    now = _utc(now)
    preds, joined = labelled_predictions(log, labels, spec, now)
    score, y = joined["score"].to_numpy(dtype=float), joined["y"].to_numpy(dtype=int)
    buckets = []
    for text in maturities:
        cutoff = now - duration(text, "maturities")
        mature = (joined["at"] <= cutoff).to_numpy()
        eligible = int((preds["at"] <= cutoff).sum())
        metrics = _metrics(score[mature], y[mature], threshold)
        buckets.append({"maturity": text, "predictions": eligible, "labelled": metrics["labelled"],
                        "coverage": metrics["labelled"] / eligible if eligible else None,
                        **{k: v for k, v in metrics.items() if k != "labelled"}})
    return LivePerformance(threshold=float(threshold), now=now.isoformat(), predictions=len(preds),
                           buckets=buckets, **_metrics(score, y, threshold))


# --- estimated performance (CBPE) ------------------------------------------------------------------


@dataclass(frozen=True)
class PerformanceEstimate:
    """Confidence-based performance estimation: the confusion matrix a calibrated model expects."""

    rows: int
    threshold: float
    expected_tp: float
    expected_fp: float
    expected_fn: float
    expected_tn: float
    precision: float | None  # None: nothing flagged
    recall: float | None  # None: no expected positive

    @property
    def expected_positives(self) -> float:
        return self.expected_tp + self.expected_fn

    def to_dict(self) -> dict:
        return asdict(self) | {"expected_positives": self.expected_positives}

    def summary(self) -> str:
        return (f"CBPE on {self.rows:,} predictions at threshold {self.threshold:g}: precision "
                f"{fmt(self.precision)}, recall {fmt(self.recall)}, {self.expected_positives:,.1f} expected positives")


def estimate_performance(scores, threshold: float, probabilities=None) -> PerformanceEstimate:
    """CBPE (NannyML's confidence-based performance estimation) for precision and recall, no labels needed.

    With calibrated probabilities p, a row scored p is positive with probability p, so at threshold t:
    expected TP = sum(p[p >= t]), FP = sum(1 - p[p >= t]), FN = sum(p[p < t]), TN = sum(1 - p[p < t]),
    precision = TP / (TP + FP), recall = TP / (TP + FN). It is only as good as the calibration (the
    `max_ece` gate) and assumes the relation of score to label has not changed (no concept drift).
    `probabilities`: the scores once calibrated (on reference data, as NannyML's CBPE does); the model
    still flags by its own score. Missing scores are left out; a score outside [0, 1] is not a
    probability: ValueError.
    """
    score = np.asarray(scores, dtype=float).ravel()
    p = score if probabilities is None else np.asarray(probabilities, dtype=float).ravel()
    keep = ~np.isnan(score) & ~np.isnan(p)
    score, p = score[keep], p[keep]
    if len(p) and (p.min() < 0 or p.max() > 1):
        raise ValueError(f"scores must be probabilities in [0, 1], found {p.min():g} .. {p.max():g}")
    flagged = score >= threshold
    tp, fp = float(p[flagged].sum()), float((1 - p[flagged]).sum())
    fn, tn = float(p[~flagged].sum()), float((1 - p[~flagged]).sum())
    return PerformanceEstimate(rows=len(p), threshold=float(threshold), expected_tp=tp, expected_fp=fp,
                               expected_fn=fn, expected_tn=tn,
                               precision=tp / (tp + fp) if flagged.any() else None,
                               recall=tp / (tp + fn) if tp + fn > 0 else None)


def _value(source, name: str) -> float | None:
    value = source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else float(value)


def _positive_rate(source) -> float | None:
    if isinstance(source, PerformanceEstimate):
        return source.expected_positives / source.rows if source.rows else None
    rate = _value(source, "positive_rate")
    if rate is not None:
        return rate
    positives, labelled = _value(source, "positives"), _value(source, "labelled")
    return positives / labelled if positives is not None and labelled else None


def compare_estimate(estimate: PerformanceEstimate, measured) -> list[dict]:
    """The estimate beside what was measured: one row per metric (precision, recall, positive rate) with
    `estimated`, `measured` and `abs_error` (None where either side is). `measured`: a LivePerformance,
    one of its bucket dicts, or a mapping with precision, recall and positives and labelled (or
    positive_rate). Compare on the same predictions: estimate on the labelled ones."""
    out = []
    for metric in ("precision", "recall", "positive_rate"):
        if metric == "positive_rate":
            est, got = _positive_rate(estimate), _positive_rate(measured)
        else:
            est, got = _value(estimate, metric), _value(measured, metric)
        out.append({"metric": metric, "estimated": est, "measured": got,
                    "abs_error": None if est is None or got is None else abs(est - got)})
    return out


def estimated_drop(estimate: PerformanceEstimate, reference, max_drop: float) -> str | None:
    """A retrain reason when the estimated precision or recall is more than `max_drop` below the
    champion's test-set figure; None when neither is (or neither can be told). `reference`: a mapping
    (or object) with `precision` and `recall`, e.g. the champion's metrics from the registry."""
    if max_drop < 0:
        raise ValueError(f"max_drop must be >= 0, got {max_drop}")
    reasons = []
    for metric in ("precision", "recall"):
        est, ref = _value(estimate, metric), _value(reference, metric)
        if est is not None and ref is not None and ref - est > max_drop:
            reasons.append(f"estimated {metric} {est:.3f} is {ref - est:.3f} below the champion's test-set "
                           f"{ref:.3f} (max drop {max_drop:g}; CBPE on {estimate.rows:,} predictions)")
    return "; ".join(reasons) or None
