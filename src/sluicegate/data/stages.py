"""The data phase's entry points: find a raw batch, validate it, quarantine it when it fails.

A failing batch of day partitions is moved to quarantine whole, and each of its days is validated on
its own, so the report and the partition ledger (`quarantine/partitions.json`) say which days fail:
the retrain window (`operate.ingest`) leaves those days out from then on. When no day fails on its
own (a check of the whole batch failed: ids repeated across days, the label rate of the whole window),
every day of the batch goes into the ledger, unattributed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from sluicegate.config import Settings, file_lock
from sluicegate.data import batches as data
from sluicegate.data import validate as validation
from sluicegate.spec import DatasetSpec


class NoBatchError(FileNotFoundError):
    """There is no raw batch to run on."""


# --- batches -------------------------------------------------------------------------------------

def find_batch(settings: Settings, batch_id: str | None) -> Path:
    """The named raw batch, or the newest one."""
    raw = settings.paths.raw
    if batch_id:
        if batch_id != Path(batch_id).name or batch_id in (".", ".."):  # a name, never a path out of raw/
            raise NoBatchError(f"batch id {batch_id!r} is not a plain folder name under {raw}")
        path = raw / batch_id
        if not path.is_dir():
            quarantined = settings.paths.quarantine / batch_id
            where = f" (it is in quarantine at {quarantined})" if quarantined.exists() else ""
            raise NoBatchError(f"no raw batch {batch_id!r} under {raw}{where}")
        return path
    batches = [p for p in raw.iterdir() if p.is_dir()] if raw.exists() else []
    if not batches:
        raise NoBatchError(f"no raw batch under {raw}: run `sluicegate generate` or `sluicegate import` first")
    return max(batches, key=lambda p: p.stat().st_mtime)


def batch_window(batch_dir: Path, spec: DatasetSpec) -> tuple[pd.Timestamp | None, pd.Timestamp | None]:
    """[first day, last day + 1) from the batch's date=YYYY-MM-DD partitions; (None, None) for a
    table without a timestamp, whose batches are files."""
    if not spec.timestamp:
        return None, None
    days = sorted(p.name.removeprefix("date=") for p in batch_dir.glob("date=*"))
    if not days:
        raise NoBatchError(f"{batch_dir} has no date=YYYY-MM-DD partitions")
    start = pd.Timestamp(days[0], tz="UTC")
    return start, pd.Timestamp(days[-1], tz="UTC") + pd.Timedelta(days=1)


# --- validation ----------------------------------------------------------------------------------

PARTITION_LEDGER = "partitions.json"


@dataclass
class ValidationOutcome:
    report: validation.ValidationReport
    quarantined_to: Path | None = None
    # day -> the checks that day fails on its own (an empty list: it passes alone); failed batches only
    days: dict[str, list[str]] = field(default_factory=dict)
    # The validated rows, what the feature stage reads (None once the batch failed, or once they are used)
    rows: pd.DataFrame | None = None

    @property
    def passed(self) -> bool:
        return self.report.success

    @property
    def bad_days(self) -> list[str]:
        return [day for day, failed in self.days.items() if failed]

    def summary(self) -> str:
        text = self.report.summary(self.quarantined_to)
        if self.passed or len(self.days) < 2:
            return text
        if self.bad_days:
            return text + f" Failing on their own: {', '.join(self.bad_days)} (left out of retrain windows)."
        return text + f" No day fails on its own: all {len(self.days)} days are held back from retrain windows."

    def result(self) -> dict:
        """The pipeline's answer when this batch stops the run."""
        return {"status": "blocked_data", "reason": self.summary(), "quarantined_to": str(self.quarantined_to),
                "bad_days": self.bad_days}


def validate_stage(settings: Settings, spec: DatasetSpec, batch_dir: Path,
                   context_root: Path) -> ValidationOutcome:
    """Validate a raw batch, its rows in the outcome; on failure move it to quarantine with its report."""
    frame = data.read_batch(batch_dir, arrow_strings=True)  # what every later stage holds: compact strings
    start, end = batch_window(batch_dir, spec)
    report = validation.validate_batch(frame, spec, batch_dir.name, start, end, context_root=context_root)
    if report.success:
        return ValidationOutcome(report, rows=frame)
    target = data.quarantine_batch(batch_dir, settings.paths.quarantine)
    validation.write_report(report, target)
    days = day_verdicts(target, spec, report, context_root)
    if days:
        _write_day_verdicts(target, days)
        record_partitions(settings.paths.quarantine, batch_dir.name, target, days)
    return ValidationOutcome(report, quarantined_to=target, days=days)


def day_verdicts(batch_dir: Path, spec: DatasetSpec, report: validation.ValidationReport,
                 context_root: Path) -> dict[str, list[str]]:
    """Each day partition of a failed batch validated on its own: day -> the checks it fails.
    One day: the batch's own failures. A table without a timestamp has no days ({}).

    The label-rate band is a share of the whole batch: one day's share of a rare label swings far
    outside it on healthy data, so a day is not judged by it alone. When the batch failed the band,
    the days whose leaving out brings the rest back inside it are the ones that fail it
    (`_label_rate_culprits`)."""
    day_dirs = sorted(batch_dir.glob("date=*")) if spec.timestamp else []
    if len(day_dirs) == 1:
        return {day_dirs[0].name.removeprefix("date="): [_check(f) for f in report.failures]}
    days: dict[str, list[str]] = {}
    for day_dir in day_dirs:
        day = day_dir.name.removeprefix("date=")
        start = pd.Timestamp(day, tz="UTC")
        try:
            alone = validation.validate_batch(data.read_batch(day_dir), spec, f"{batch_dir.name}_date={day}",
                                              start, start + pd.Timedelta(days=1), context_root=context_root)
        except Exception as exc:  # unreadable on its own (a corrupt file): that day is bad
            days[day] = [f"table: could not be validated on its own ({type(exc).__name__}: {exc})"]
            continue
        days[day] = [_check(f) for f in alone.failures if not _is_label_rate(f, spec)]
    band = [f for f in report.failures if _is_label_rate(f, spec)]
    if band:
        for day in _label_rate_culprits(day_dirs, spec):
            days[day].append(f"{_check(band[0])}; within the band without this day")
    return days


def _is_label_rate(failure: validation.FailedCheck, spec: DatasetSpec) -> bool:
    """The label-rate band's share checks (the label's own value set, without `mostly`, is not one)."""
    return failure.column == spec.label and "label_rate" in failure.detail


def _label_rate_culprits(day_dirs: list[Path], spec: DatasetSpec) -> list[str]:
    """The fewest days, most extreme share first, whose leaving out brings the positive share of the
    rest inside the spec's label-rate band; [] when even leaving out all but one day does not."""
    low, high = spec.label_rate
    counts = {}
    for day_dir in day_dirs:
        labels = [pd.read_parquet(f, columns=[spec.label])[spec.label].dropna()
                  for f in sorted(day_dir.glob("*.parquet")) if spec.label in pq.read_schema(f).names]
        counts[day_dir.name.removeprefix("date=")] = (sum(float(spec.positive(v).sum()) for v in labels),
                                                      sum(len(v) for v in labels))
    positives, rows = (sum(c[i] for c in counts.values()) for i in (0, 1))
    if not rows:
        return []
    above = positives / rows > high
    order = sorted((day for day in counts if counts[day][1]),
                   key=lambda day: counts[day][0] / counts[day][1], reverse=above)
    culprits: list[str] = []
    for day in order[:-1]:
        culprits.append(day)
        positives, rows = positives - counts[day][0], rows - counts[day][1]
        if low <= positives / rows <= high:
            return sorted(culprits)
    return []


def _check(failure: validation.FailedCheck) -> str:
    return f"{failure.column or 'table'}: {failure.expectation} ({failure.detail})"


def _write_day_verdicts(target: Path, days: dict[str, list[str]]) -> None:
    """The days under the report: which fail alone, and with what."""
    lines = ["", "## Day partitions, each validated on its own", "", "| day | verdict | checks failed alone |",
             "|---|---|---|"]
    for day, failed in days.items():
        checks = "; ".join(failed).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {day} | {'FAILED' if failed else 'passed'} | {checks} |")
    with open(target / "validation_report.md", "a") as report:
        report.write("\n".join(lines) + "\n")
    (target / "day_verdicts.json").write_text(json.dumps(days, indent=2) + "\n")


# --- the partition ledger ------------------------------------------------------------------------

def record_partitions(quarantine_dir: Path, batch_id: str, quarantined_to: Path,
                      days: dict[str, list[str]]) -> list[dict]:
    """Add the failing days of a quarantined batch to `quarantine/partitions.json` (every day,
    unattributed, when none fails alone), with the report and the newest modification time of each
    day's files: a partition written again later is new data and is not held back."""
    bad = [day for day, failed in days.items() if failed]
    attributed = bool(bad)
    at = datetime.now(UTC).isoformat()
    entries = []
    for day in bad or list(days):
        files = list((quarantined_to / f"date={day}").glob("*.parquet"))
        entries.append({"batch_id": batch_id, "day": day, "attributed": attributed,
                        "failed_checks": days[day], "written": max((f.stat().st_mtime for f in files), default=0.0),
                        "quarantined_to": str(quarantined_to),
                        "report": str(quarantined_to / "validation_report.md"), "at": at})
    path = quarantine_dir / PARTITION_LEDGER
    with file_lock(path.with_suffix(".lock")):
        ledger = _read_ledger(path)
        ledger["partitions"].extend(entries)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ledger, indent=2) + "\n")
        tmp.replace(path)
    return entries


def quarantined_partitions(quarantine_dir: Path) -> list[dict]:
    """Every entry of the partition ledger, oldest first ([] when there is none)."""
    return _read_ledger(quarantine_dir / PARTITION_LEDGER)["partitions"]


def _read_ledger(path: Path) -> dict:
    try:
        ledger = json.loads(path.read_text())
    except FileNotFoundError:
        return {"partitions": []}
    except ValueError as exc:
        raise ValueError(f"{path} is unreadable ({exc}); fix or delete it (the quarantined batches beside it "
                         "keep their reports)") from None
    if not isinstance(ledger, dict) or not isinstance(ledger.get("partitions"), list):
        raise ValueError(f"{path} is not a partition ledger (expected {{\"partitions\": [...]}})")
    return ledger
