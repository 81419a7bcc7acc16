"""Ingest: assemble the newest N days of raw partitions into one window batch.

New data lands as day partitions `raw/<batch_id>/date=YYYY-MM-DD/*.parquet`
(from any producer). A retrain should see a sliding window of the newest days,
so this step picks, for each day, the partition of the most recently written
batch that has it, and links those files into `raw/window_<first>_<last>/`
with a manifest naming every source. Window batches are never sources
themselves, so windows never copy windows.

A day partition that failed validation is left out: the partition ledger
(`quarantine/partitions.json`, written by `data.stages` when a batch fails)
names it, and for a quarantined window its manifest, moved with it, names the
source batch of that day. The window's summary names every day left out. A
partition written again after it was quarantined is new data and is taken.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sluicegate.data import stages as data
from sluicegate.data.batches import WINDOW_PREFIX, Partition, list_partitions, newest_per_day

MANIFEST = "window.json"


class NoPartitionsError(FileNotFoundError):
    """There is no day partition under raw/ to build a window from."""


@dataclass
class Window:
    batch_id: str
    path: Path
    days: list[str]
    sources: dict[str, str]  # day -> source batch id
    reused: bool  # an identical window already existed
    skipped: dict[str, str] = field(default_factory=dict)  # day -> why a quarantined partition was left out

    def to_dict(self) -> dict:
        return {**asdict(self), "path": str(self.path)}

    def summary(self) -> str:
        verb = "reused" if self.reused else "assembled"
        text = (f"ingest: {verb} {self.batch_id}: {len(self.days)} days {self.days[0]}..{self.days[-1]} "
                f"from {len(set(self.sources.values()))} batch(es)")
        if self.skipped:
            text += f"; left out {len(self.skipped)} quarantined day(s): " + "; ".join(
                f"{day} ({why})" for day, why in self.skipped.items())
        return text


@dataclass(frozen=True)
class Held:
    """A day partition the ledger holds back."""

    batch_id: str  # the source batch of the day
    day: str
    written: float  # newest modification time of its files when it was quarantined
    reason: str

    def holds(self, part: Partition) -> bool:
        return (part.batch_id, part.day) == (self.batch_id, self.day) and part.written <= self.written + 1e-3


def select_window(partitions: list[Partition], days: int) -> list[Partition]:
    """The newest `days` calendar days that have data, oldest first."""
    if days < 1:
        raise ValueError(f"a window needs at least 1 day, got {days}")
    per_day = newest_per_day(partitions)
    return [per_day[d] for d in sorted(per_day)[-days:]]


def window_id(selected: list[Partition]) -> str:
    return f"{WINDOW_PREFIX}{selected[0].day}_{selected[-1].day}_{len(selected)}d"


def held_partitions(quarantine_dir: Path) -> list[Held]:
    """The source partitions the partition ledger holds back; a window's entry is resolved to the batch
    its day came from through the window's manifest (moved to quarantine with it)."""
    held = []
    for entry in data.quarantined_partitions(quarantine_dir):
        source, day = entry["batch_id"], entry["day"]
        if source.startswith(WINDOW_PREFIX):
            source = ((_manifest(Path(entry["quarantined_to"])) or {}).get("sources") or {}).get(day)
            if source is None:  # its manifest is gone: nothing left to tell which batch the day came from
                continue
        checks = "; ".join(entry.get("failed_checks") or []) or "the window failed as a whole"
        what = "failed validation" if entry.get("attributed", True) else "in a window that failed validation"
        held.append(Held(source, day, float(entry.get("written") or 0.0),
                         f"{source} {what}: {checks}; report {entry['report']}"))
    return held


def assemble_window(raw_dir: Path, days: int, quarantine_dir: Path | None = None) -> Window:
    """Build (or reuse) the window batch of the newest `days` days under raw_dir, leaving out the day
    partitions the partition ledger under quarantine_dir (default: raw_dir's sibling `quarantine/`) holds."""
    quarantine_dir = raw_dir.parent / "quarantine" if quarantine_dir is None else quarantine_dir
    held = held_partitions(quarantine_dir)
    partitions = list_partitions(raw_dir)
    left_out = [p for p in partitions if any(h.holds(p) for h in held)]
    selected = select_window([p for p in partitions if p not in left_out], days)
    if not selected:
        extra = f" ({len(left_out)} quarantined partition(s) left out, see {quarantine_dir / data.PARTITION_LEDGER})" \
            if left_out else ""
        raise NoPartitionsError(f"no date=YYYY-MM-DD partitions under {raw_dir}{extra}: generate or land a batch first")
    skipped = _skipped(left_out, held, selected)
    batch_id = window_id(selected)
    target = raw_dir / batch_id
    sources = {p.day: p.batch_id for p in selected}
    manifest = {"days": [p.day for p in selected], "sources": sources,
                "written": {p.day: p.written for p in selected}}
    if _manifest(target) == manifest:
        return Window(batch_id, target, manifest["days"], sources, reused=True, skipped=skipped)
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
    return Window(batch_id, target, manifest["days"], sources, reused=False, skipped=skipped)


def _skipped(left_out: list[Partition], held: list[Held], selected: list[Partition]) -> dict[str, str]:
    """Why each day from the window's first on lost a partition to quarantine (older days would not
    have been in it anyway)."""
    chosen = {p.day: p.batch_id for p in selected}
    skipped: dict[str, list[str]] = {}
    for part in sorted(left_out, key=lambda p: (p.day, p.batch_id)):
        if part.day < selected[0].day:
            continue
        why = next(h.reason for h in held if h.holds(part))
        if part.day in chosen:
            why += f"; took {chosen[part.day]}'s partition of that day instead"
        skipped.setdefault(part.day, []).append(why)
    return {day: " | ".join(reasons) for day, reasons in skipped.items()}


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
