"""The ingest step: newest N days across batches, one source per day, idempotent."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from sluicegate.data.batches import read_batch, write_batch
from sluicegate.data.synthetic import GenerateConfig, generate_transactions
from sluicegate.operate import ingest


def _batch(spec, raw, start: str, days: int, seed: int, mtime: float) -> str:
    cfg = GenerateConfig(rows=days * 150, days=days, seed=seed, start=start)
    write_batch(generate_transactions(cfg, spec), raw, cfg.batch_id, spec.timestamp)
    for f in (raw / cfg.batch_id).rglob("*.parquet"):
        os.utime(f, (mtime, mtime))
    return cfg.batch_id


def test_window_takes_the_newest_days_and_the_newest_batch_per_day(spec, tmp_path):
    raw = tmp_path / "raw"
    old = _batch(spec, raw, "2026-10-01", 5, seed=1, mtime=1_000)
    new = _batch(spec, raw, "2026-10-04", 4, seed=2, mtime=2_000)  # overlaps 10-04 and 10-05
    window = ingest.assemble_window(raw, days=4)
    assert window.batch_id == "window_2026-10-04_2026-10-07_4d"
    assert window.days == ["2026-10-04", "2026-10-05", "2026-10-06", "2026-10-07"]
    assert set(window.sources.values()) == {new}
    wide = ingest.assemble_window(raw, days=30)
    assert wide.days[0] == "2026-10-01" and len(wide.days) == 7
    assert wide.sources["2026-10-03"] == old and wide.sources["2026-10-05"] == new
    frame = read_batch(wide.path)
    assert frame[spec.id].is_unique  # one source per day: no row twice
    days = pd.to_datetime(frame[spec.timestamp], utc=True).dt.strftime("%Y-%m-%d")
    assert sorted(days.unique()) == wide.days


def test_windows_are_reused_and_never_used_as_sources(spec, tmp_path):
    raw = tmp_path / "raw"
    _batch(spec, raw, "2026-10-01", 3, seed=1, mtime=1_000)
    first = ingest.assemble_window(raw, days=2)
    again = ingest.assemble_window(raw, days=2)
    assert not first.reused and again.reused
    assert all(not p.batch_id.startswith("window_") for p in ingest.list_partitions(raw))
    # A new day arrives: the window slides.
    _batch(spec, raw, "2026-10-04", 1, seed=3, mtime=3_000)
    slid = ingest.assemble_window(raw, days=2)
    assert slid.days == ["2026-10-03", "2026-10-04"] and not slid.reused


def test_nothing_to_ingest_says_so(tmp_path):
    with pytest.raises(ingest.NoPartitionsError, match="no date=YYYY-MM-DD partitions"):
        ingest.assemble_window(tmp_path / "raw", days=3)
    with pytest.raises(ValueError):
        ingest.select_window([], 0)
