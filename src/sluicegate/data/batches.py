"""Raw batches on disk: written as day partitions (or files, without a timestamp), read back whole,
moved to quarantine."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd


def write_batch(df: pd.DataFrame, raw_dir: Path, batch_id: str, timestamp: str | None) -> Path:
    """Write one parquet file per day under raw_dir/batch_id/date=YYYY-MM-DD/; a table without a
    timestamp is one file, raw_dir/batch_id/part-0.parquet."""
    batch_dir = raw_dir / batch_id
    if batch_dir.exists():
        shutil.rmtree(batch_dir)
    if timestamp is None:
        batch_dir.mkdir(parents=True)
        df.to_parquet(batch_dir / "part-0.parquet", index=False)
        return batch_dir
    days = pd.to_datetime(df[timestamp], utc=True).dt.strftime("%Y-%m-%d")
    for day, part in df.groupby(days, sort=True):
        day_dir = batch_dir / f"date={day}"
        day_dir.mkdir(parents=True)
        part.to_parquet(day_dir / "part-0.parquet", index=False)
    return batch_dir


def read_batch(batch_dir: Path) -> pd.DataFrame:
    """Read every day partition of a batch, in day order, as written (or its files, without days)."""
    files = sorted(batch_dir.glob("date=*/*.parquet")) or sorted(batch_dir.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet partitions under {batch_dir}")
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def day_partitions(raw_dir: Path) -> dict[str, Path]:
    """The most recently written date=YYYY-MM-DD folder of each day, over every batch under raw_dir."""
    best: dict[str, tuple[float, Path]] = {}
    for day_dir in raw_dir.glob("*/date=*") if raw_dir.exists() else []:
        files = list(day_dir.glob("*.parquet"))
        if not files or day_dir.parent.name.startswith("."):  # empty, or a window being staged
            continue
        written = max(f.stat().st_mtime for f in files)
        day = day_dir.name.removeprefix("date=")
        if day not in best or written > best[day][0]:
            best[day] = (written, day_dir)
    return {day: path for day, (_, path) in sorted(best.items())}


def read_history(raw_dir: Path, timestamp: str, since: pd.Timestamp, before: pd.Timestamp,
                 columns: list[str]) -> pd.DataFrame:
    """Raw rows with since <= timestamp < before, only `columns`, from the newest partition of each day."""
    days = pd.date_range(since.floor("D"), before.floor("D"), freq="D").strftime("%Y-%m-%d")
    found = day_partitions(raw_dir)
    parts = [pd.read_parquet(f, columns=columns) for day in days if day in found
             for f in sorted(found[day].glob("*.parquet"))]
    if not parts:
        return pd.DataFrame(columns=columns)
    rows = pd.concat(parts, ignore_index=True)
    when = pd.to_datetime(rows[timestamp], utc=True)
    return rows[(when >= since) & (when < before)].reset_index(drop=True)


def quarantine_batch(batch_dir: Path, quarantine_dir: Path) -> Path:
    """Move a batch out of the raw area, keeping every file."""
    target = quarantine_dir / batch_dir.name
    if target.exists():
        target = quarantine_dir / f"{batch_dir.name}-{pd.Timestamp.now(tz='UTC'):%Y%m%dT%H%M%S%f}"
    quarantine_dir.mkdir(parents=True, exist_ok=True)
    shutil.move(str(batch_dir), target)
    return target
