"""The ingest step: newest N days across batches, one source per day, idempotent."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from sluicegate.data.batches import list_partitions, read_batch, write_batch
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
    assert all(not p.batch_id.startswith("window_") for p in list_partitions(raw))
    # A new day arrives: the window slides.
    _batch(spec, raw, "2026-10-04", 1, seed=3, mtime=3_000)
    slid = ingest.assemble_window(raw, days=2)
    assert slid.days == ["2026-10-03", "2026-10-04"] and not slid.reused


def test_nothing_to_ingest_says_so(tmp_path):
    with pytest.raises(ingest.NoPartitionsError, match="no date=YYYY-MM-DD partitions"):
        ingest.assemble_window(tmp_path / "raw", days=3)
    with pytest.raises(ValueError):
        ingest.select_window([], 0)


# --- quarantined day partitions ------------------------------------------------------------------

@pytest.fixture(scope="module")
def gx_context(tmp_path_factory):
    import shutil

    from tests.conftest import REPO

    target = tmp_path_factory.mktemp("gx") / "expectations"
    shutil.copytree(REPO / "expectations", target, ignore=shutil.ignore_patterns("uncommitted"))
    return target


def _faulty_day(spec, raw, day: str, fault: str, seed: int, mtime: float) -> str:
    from sluicegate.data.synthetic import inject_fault

    cfg = GenerateConfig(rows=1_000, days=1, seed=seed, start=day, fault=fault)
    write_batch(inject_fault(generate_transactions(cfg, spec), fault, spec, seed), raw, cfg.batch_id, spec.timestamp)
    for f in (raw / cfg.batch_id).rglob("*.parquet"):
        os.utime(f, (mtime, mtime))
    return cfg.batch_id


def _fail_once(settings, spec, raw, days, gx_context):
    from sluicegate.data import stages as data

    window = ingest.assemble_window(raw, days)
    outcome = data.validate_stage(settings, spec, window.path, gx_context)
    assert not outcome.passed and outcome.rows is None
    return window, outcome


def test_a_poisoned_day_fails_validation_once_and_the_next_window_leaves_it_out(home, spec, gx_context):
    from sluicegate.config import Settings, ensure_home
    from sluicegate.data import stages as data

    settings = Settings()
    raw = ensure_home(settings.paths).raw
    clean = _batch(spec, raw, "2026-10-01", 6, seed=1, mtime=1_000)
    bad = _faulty_day(spec, raw, "2026-10-07", "out_of_range", seed=2, mtime=2_000)

    window, outcome = _fail_once(settings, spec, raw, 7, gx_context)
    assert window.sources["2026-10-07"] == bad
    assert outcome.bad_days == ["2026-10-07"], outcome.days  # the six clean days pass on their own
    assert "Failing on their own: 2026-10-07" in outcome.summary()
    assert outcome.result()["bad_days"] == ["2026-10-07"]
    (entry,) = data.quarantined_partitions(settings.paths.quarantine)
    assert (entry["batch_id"], entry["day"], entry["attributed"]) == (window.batch_id, "2026-10-07", True)
    assert "amount" in entry["failed_checks"][0] and entry["report"].endswith("validation_report.md")
    report = (outcome.quarantined_to / "validation_report.md").read_text()
    assert "| 2026-10-07 | FAILED |" in report and "| 2026-10-01 | passed |" in report

    again = ingest.assemble_window(raw, 7)
    assert again.days == [f"2026-10-0{d}" for d in range(1, 7)] and set(again.sources.values()) == {clean}
    assert list(again.skipped) == ["2026-10-07"] and bad in again.skipped["2026-10-07"]
    assert "left out 1 quarantined day(s): 2026-10-07 (" in again.summary() and entry["report"] in again.summary()
    passed = data.validate_stage(settings, spec, again.path, gx_context)
    assert passed.passed and len(passed.rows) > 0  # the next night trains on the rest
    assert ingest.assemble_window(raw, 7).skipped == again.skipped  # and keeps saying so

    # The producer lands that day again (a newer write): new data, taken again.
    for f in (raw / bad).rglob("*.parquet"):
        os.utime(f, (3_000, 3_000))
    assert "2026-10-07" in ingest.assemble_window(raw, 7).days


def test_a_quarantined_day_another_batch_also_has_is_taken_from_that_batch(home, spec, gx_context):
    from sluicegate.config import Settings, ensure_home

    settings = Settings()
    raw = ensure_home(settings.paths).raw
    clean = _batch(spec, raw, "2026-10-01", 4, seed=1, mtime=1_000)
    bad = _faulty_day(spec, raw, "2026-10-03", "nulls", seed=3, mtime=2_000)  # newer: it wins 2026-10-03
    _, outcome = _fail_once(settings, spec, raw, 4, gx_context)
    assert outcome.bad_days == ["2026-10-03"]
    again = ingest.assemble_window(raw, 4)
    assert again.sources["2026-10-03"] == clean and len(again.days) == 4
    assert f"took {clean}'s partition of that day instead" in again.skipped["2026-10-03"]
    assert bad in again.skipped["2026-10-03"]


def test_a_failure_no_day_has_alone_holds_back_every_day_of_the_window(home, spec, gx_context):
    from sluicegate.config import Settings, ensure_home
    from sluicegate.data import stages as data

    settings = Settings()
    raw = ensure_home(settings.paths).raw
    batch = _batch(spec, raw, "2026-10-01", 3, seed=1, mtime=1_000)
    # One id on two days: each day is unique on its own, the window is not.
    first, second = sorted((raw / batch).glob("date=*"))[:2]
    day1, day2 = pd.read_parquet(first / "part-0.parquet"), pd.read_parquet(second / "part-0.parquet")
    day2.loc[0, spec.id] = day1.loc[0, spec.id]
    day2.to_parquet(second / "part-0.parquet", index=False)
    for f in (raw / batch).rglob("*.parquet"):
        os.utime(f, (1_000, 1_000))

    window, outcome = _fail_once(settings, spec, raw, 3, gx_context)
    assert outcome.bad_days == [] and "No day fails on its own: all 3 days are held back" in outcome.summary()
    entries = data.quarantined_partitions(settings.paths.quarantine)
    assert [(e["day"], e["attributed"]) for e in entries] == [(d, False) for d in window.days]
    with pytest.raises(ingest.NoPartitionsError, match="3 quarantined partition"):
        ingest.assemble_window(raw, 3)
    _batch(spec, raw, "2026-10-04", 1, seed=5, mtime=4_000)  # a new day lands
    nxt = ingest.assemble_window(raw, 3)
    assert nxt.days == ["2026-10-04"] and len(nxt.skipped) == 0  # older days are not in its range


def test_an_unreadable_partition_ledger_is_an_error_that_names_it(tmp_path):
    (tmp_path / "quarantine").mkdir()
    (tmp_path / "quarantine" / "partitions.json").write_text("{oops")
    with pytest.raises(ValueError, match="partitions.json is unreadable"):
        ingest.assemble_window(tmp_path / "raw", 3)


def test_a_day_that_pushes_the_label_rate_out_of_band_is_the_one_held_back(home, spec, gx_context):
    """The label-rate band is a share of the whole window: a healthy day's own share of a rare label
    swings outside it, so only the day whose leaving out brings the rest back inside is attributed."""
    from sluicegate.config import Settings, ensure_home

    settings = Settings()
    raw = ensure_home(settings.paths).raw
    batch = _batch(spec, raw, "2026-10-01", 4, seed=1, mtime=1_000)
    third = sorted((raw / batch).glob("date=*"))[2]
    day = pd.read_parquet(third / "part-0.parquet")
    day.loc[day.index[: len(day) * 2 // 5], spec.label] = spec.table.positive  # 40% positive on one day
    day.to_parquet(third / "part-0.parquet", index=False)
    for f in (raw / batch).rglob("*.parquet"):
        os.utime(f, (1_000, 1_000))
    _, outcome = _fail_once(settings, spec, raw, 4, gx_context)
    assert any("label_rate" in f.detail for f in outcome.report.failures)
    assert outcome.bad_days == ["2026-10-03"], outcome.days
    assert "within the band without this day" in outcome.days["2026-10-03"][0]
    assert ingest.assemble_window(raw, 4).days == ["2026-10-01", "2026-10-02", "2026-10-04"]
