"""The data phase's entry points: find a raw batch, validate it, quarantine it when it fails."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from sluicegate.config import Settings
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

@dataclass
class ValidationOutcome:
    report: validation.ValidationReport
    quarantined_to: Path | None = None

    @property
    def passed(self) -> bool:
        return self.report.success

    def summary(self) -> str:
        return self.report.summary(self.quarantined_to)

    def result(self) -> dict:
        """The pipeline's answer when this batch stops the run."""
        return {"status": "blocked_data", "reason": self.summary(), "quarantined_to": str(self.quarantined_to)}


def validate_stage(settings: Settings, spec: DatasetSpec, batch_dir: Path,
                   context_root: Path) -> tuple[ValidationOutcome, pd.DataFrame | None]:
    """Validate a raw batch; on failure move it to quarantine with its report."""
    frame = data.read_batch(batch_dir)
    start, end = batch_window(batch_dir, spec)
    report = validation.validate_batch(frame, spec, batch_dir.name, start, end, context_root=context_root)
    if report.success:
        return ValidationOutcome(report), frame
    target = data.quarantine_batch(batch_dir, settings.paths.quarantine)
    validation.write_report(report, target)
    return ValidationOutcome(report, quarantined_to=target), None
