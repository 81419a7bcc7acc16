"""Retention: predictions and labels older than the spec's `table.retention` are deleted.

The cutoff is `now - retention`; what was written before it goes, each judged by when it was written:
- the prediction log's hour partitions (`<endpoint>/date=YYYY-MM-DD/hour=HH/`, `serve.predlog`) whose
  hour ended at or before the cutoff, by the hour in their name (the server writes only to the hour
  of its flush, so nothing lands there any more);
- every other file under the predictions folder (the dead-letter folder, a log of your own), by its
  modification time;
- label files (`labelled_date=.../labels-<YYYYMMDDTHHMMSSZ>-<hash8>.parquet`, `operate.labels`) by the
  import time in their name, any other file under the labels folder by its modification time;
- what the monitor or `read_labels` quarantined from either, by its modification time.

A label counts from its import, not from its prediction: a label imported late is kept for the whole
period after it arrived. Without `table.retention` nothing is deleted. Plain files and folders; the
monitor flow runs it before each check.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd

from sluicegate.operate.labels import QUARANTINE_FOLDER

PREDICTIONS_QUARANTINE = "predictions"  # the monitor's folder for unreadable log files, under quarantine/
IMPORTED = re.compile(r"labels-(\d{8}T\d{6}Z)-")  # the import time in a label file's name


@dataclass(frozen=True)
class RetentionOutcome:
    retention: str | None  # None: no table.retention, nothing deleted
    cutoff: str | None  # written before this: deleted
    prediction_hours: list[str] = field(default_factory=list)  # hour partitions, as folders
    label_files: list[str] = field(default_factory=list)
    other_files: list[str] = field(default_factory=list)  # dead letters, quarantined copies, other log files

    def summary(self) -> str:
        if self.retention is None:
            return "retention: no table.retention in the spec, everything is kept"
        return (f"retention {self.retention}: deleted {len(self.prediction_hours)} prediction hour(s), "
                f"{len(self.label_files)} label file(s) and {len(self.other_files)} other file(s) written "
                f"before {self.cutoff}")

    def to_dict(self) -> dict:
        return asdict(self)


def apply_retention(predictions: Path, labels: Path, quarantine: Path, retention: pd.Timedelta | None,
                    now: datetime) -> RetentionOutcome:
    """Delete what was written before `now - retention` under the predictions and labels folders and
    their quarantined copies; what was deleted, by path."""
    if retention is None:
        return RetentionOutcome(None, None)
    stamp = pd.Timestamp(now)
    cutoff = (stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")) - retention
    hours = _old_hours(Path(predictions), cutoff)
    for hour in hours:
        shutil.rmtree(hour, ignore_errors=True)  # a folder another monitor removed first is gone all the same
        _remove_if_empty(hour.parent)
    old_labels = [p for p in _files(Path(labels)) if _label_written(p) < cutoff]
    others = [p for p in _files(Path(predictions)) if not _in_hour(p) and _modified(p) < cutoff]
    quarantined = [Path(quarantine) / PREDICTIONS_QUARANTINE, Path(quarantine) / QUARANTINE_FOLDER]
    others += [p for folder in quarantined for p in _files(folder) if _modified(p) < cutoff]
    for path in old_labels + others:
        path.unlink(missing_ok=True)
    return RetentionOutcome(_text(retention), str(cutoff), [str(h) for h in hours],
                            [str(p) for p in old_labels], [str(p) for p in others])


def _text(retention: pd.Timedelta) -> str:
    return str(retention).removesuffix(" 00:00:00")


def _old_hours(folder: Path, cutoff: pd.Timestamp) -> list[Path]:
    """Hour partitions (the layout `compact_hours` reads) whose hour ended at or before the cutoff."""
    hours = folder.glob("*/date=*/hour=*") if folder.exists() else []
    return sorted(h for h in hours if h.is_dir() and (end := _hour_end(h)) is not None and end <= cutoff)


def _hour_end(hour: Path) -> pd.Timestamp | None:
    day, hh = hour.parent.name.removeprefix("date="), hour.name.removeprefix("hour=")
    try:
        return pd.Timestamp(f"{day} {int(hh):02d}:00", tz="UTC") + pd.Timedelta(hours=1)
    except ValueError:  # not a partition the server wrote: its files go by their modification time
        return None


def _in_hour(path: Path) -> bool:
    """Inside a well-formed hour partition (judged by its name, never by a file's time)."""
    return any(part.name.startswith("hour=") and _hour_end(part) is not None for part in path.parents)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _modified(path: Path) -> pd.Timestamp:
    return pd.Timestamp(path.stat().st_mtime, unit="s", tz="UTC")


def _label_written(path: Path) -> pd.Timestamp:
    """A label file's import time, from its name; a file named otherwise: its modification time."""
    found = IMPORTED.match(path.name)
    return pd.Timestamp(found.group(1)) if found else _modified(path)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (another hour of the day) or already gone
        folder.rmdir()
