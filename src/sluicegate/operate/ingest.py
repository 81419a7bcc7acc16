"""Ingest: assemble the newest N days of raw partitions into one window batch.

New data lands as day partitions `raw/<batch_id>/date=YYYY-MM-DD/*.parquet`
(from any producer). A retrain should see a sliding window of the newest days,
so this step picks, for each day, the partition of the most recently written
batch that has it, and links those files into `raw/window_<first>_<last>/`
with a manifest naming every source. Window batches are never sources
themselves, so windows never copy windows.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

WINDOW_PREFIX = "window_"
MANIFEST = "window.json"


class NoPartitionsError(FileNotFoundError):
    """There is no day partition under raw/ to build a window from."""


@dataclass(frozen=True)
class Partition:
    day: str  # YYYY-MM-DD
    batch_id: str
    path: Path  # the date=YYYY-MM-DD folder
    written: float  # newest modification time of its files


@dataclass
class Window:
    batch_id: str
    path: Path
    days: list[str]
    sources: dict[str, str]  # day -> source batch id
    reused: bool  # an identical window already existed

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}

    def summary(self) -> str:
        verb = "reused" if self.reused else "assembled"
        return (f"ingest: {verb} {self.batch_id}: {len(self.days)} days {self.days[0]}..{self.days[-1]} "
                f"from {len(set(self.sources.values()))} batch(es)")


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


def select_window(partitions: list[Partition], days: int) -> list[Partition]:
    """The newest `days` calendar days that have data, oldest first."""
    if days < 1:
        raise ValueError(f"a window needs at least 1 day, got {days}")
    per_day = newest_per_day(partitions)
    return [per_day[d] for d in sorted(per_day)[-days:]]


def window_id(selected: list[Partition]) -> str:
    return f"{WINDOW_PREFIX}{selected[0].day}_{selected[-1].day}_{len(selected)}d"


def assemble_window(raw_dir: Path, days: int) -> Window:
    """Build (or reuse) the window batch of the newest `days` days under raw_dir."""
    selected = select_window(list_partitions(raw_dir), days)
    if not selected:
        raise NoPartitionsError(f"no date=YYYY-MM-DD partitions under {raw_dir}: generate or land a batch first")
    batch_id = window_id(selected)
    target = raw_dir / batch_id
    sources = {p.day: p.batch_id for p in selected}
    manifest = {"days": [p.day for p in selected], "sources": sources,
                "written": {p.day: p.written for p in selected}}
    if _manifest(target) == manifest:
        return Window(batch_id, target, manifest["days"], sources, reused=True)
    staging = raw_dir / f".{batch_id}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    for part in selected:
        day_dir = staging / part.path.name
        day_dir.mkdir(parents=True)
        for f in sorted(part.path.glob("*.parquet")):
            _link_or_copy(f, day_dir / f.name)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # readers never see a half-built window
    return Window(batch_id, target, manifest["days"], sources, reused=False)


def _manifest(batch_dir: Path) -> dict | None:
    try:
        return json.loads((batch_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link costs no space and survives the source batch being quarantined or deleted."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
