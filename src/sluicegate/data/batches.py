"""Raw batches on disk: written as day partitions (or files, without a timestamp), read back whole,
moved to quarantine."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


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


def read_batch(batch_dir: Path, arrow_strings: bool = False) -> pd.DataFrame:
    """Read every day partition of a batch, in day order, as written (or its files, without days).

    `arrow_strings`: string columns as pyarrow strings, never made into Python objects on the way
    (about a third of the memory)."""
    files = sorted(batch_dir.glob("date=*/*.parquet")) or sorted(batch_dir.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet partitions under {batch_dir}")
    if arrow_strings:
        strings = {pa.string(): pd.StringDtype("pyarrow"), pa.large_string(): pd.StringDtype("pyarrow")}
        return pd.concat([pq.read_table(f).to_pandas(types_mapper=strings.get) for f in files], ignore_index=True)
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


# Window batches (`operate.ingest`) link the partitions of other batches: never a source themselves.
WINDOW_PREFIX = "window_"


@dataclass(frozen=True)
class Partition:
    day: str  # YYYY-MM-DD
    batch_id: str
    path: Path  # the date=YYYY-MM-DD folder
    written: float  # newest modification time of its files


def list_partitions(raw_dir: Path) -> list[Partition]:
    """Every day partition of every non-window batch under raw_dir."""
    found = []
    for batch in sorted(raw_dir.iterdir()) if raw_dir.exists() else []:
        if not batch.is_dir() or batch.name.startswith(WINDOW_PREFIX):
            continue
        for day_dir in sorted(batch.glob("date=*")):
            files = list(day_dir.glob("*.parquet"))
            if files:
                found.append(Partition(day=day_dir.name.removeprefix("date="), batch_id=batch.name,
                                       path=day_dir, written=max(f.stat().st_mtime for f in files)))
    return found


def newest_per_day(partitions: list[Partition]) -> dict[str, Partition]:
    """One partition per day: the most recently written one (ties: the larger batch id)."""
    best: dict[str, Partition] = {}
    for part in partitions:
        current = best.get(part.day)
        if current is None or (part.written, part.batch_id) > (current.written, current.batch_id):
            best[part.day] = part
    return best


def read_history(raw_dir: Path, timestamp: str, since: pd.Timestamp, before: pd.Timestamp,
                 columns: list[str]) -> pd.DataFrame:
    """Raw rows with since <= timestamp < before, only `columns`, from the newest partition of each day."""
    days = pd.date_range(since.floor("D"), before.floor("D"), freq="D").strftime("%Y-%m-%d")
    found = newest_per_day(list_partitions(raw_dir))
    parts = [pd.read_parquet(f, columns=columns) for day in days if day in found
             for f in sorted(found[day].path.glob("*.parquet"))]
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


def quarantine_file(path: Path, target: Path, reason: str) -> Path:
    """Move one unreadable file to `target` (suffixed -1, -2... if taken), with `<name>.reason.txt` beside
    it saying where it was, when and why; returns where it went."""
    base, n = target, 1
    while target.exists():
        target, n = base.with_name(f"{base.stem}-{n}{base.suffix}"), n + 1
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(path, target)
    target.with_name(target.name + ".reason.txt").write_text(
        f"source: {path}\nquarantined_at: {pd.Timestamp.now(tz='UTC').isoformat()}\nreason: {reason}\n")
    return target
