"""Retention: what the real prediction log and label import wrote before `now - table.retention` is
deleted, everything newer is kept, and nothing at all without a retention."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sluicegate.config import Settings
from sluicegate.operate import labels as lab
from sluicegate.operate import stages
from sluicegate.operate.monitor import read_prediction_log
from sluicegate.serve.predlog import DEAD_LETTER, PredictionLog, Record
from sluicegate.spec import DEFAULT_SPEC_PATH

NOW = datetime(2026, 6, 1, 12, 30, tzinfo=UTC)
OLD, FRESH = NOW - timedelta(days=40), NOW - timedelta(days=29, hours=23)  # either side of a 30d retention


def _settings(tmp_path: Path, retention: str | None) -> Settings:
    raw = yaml.safe_load(DEFAULT_SPEC_PATH.read_text())
    if retention:
        raw["table"]["retention"] = retention
    spec_path = tmp_path / f"spec-{retention}.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    return Settings(home=tmp_path / "home", spec_path=spec_path)


def _log_at(folder: Path, when: datetime, request_id: str, broken: bool = False) -> None:
    """One record through the real log, flushed as if at `when` (its hour partition); `broken` records
    (row counts that do not add up) land in the dead-letter folder, dated `when`."""
    rows = [2] if broken else [1]
    record = Record("predict", when.timestamp(), "m", "1", [request_id], [0.5], rows, np.array([0.2]), {"x": [1]})
    log = PredictionLog(folder, max_queue=10, flush_seconds=3600, clock=when.timestamp)
    log.put(record)
    log.close()
    for dead in (folder / DEAD_LETTER).glob("*.jsonl") if broken else []:
        os.utime(dead, (when.timestamp(), when.timestamp()))


def _labels_at(settings: Settings, when: datetime, ids: list[str], tmp_path: Path) -> Path:
    spec = settings.spec
    source = tmp_path / f"labels-{when:%Y%m%d}.csv"
    pd.DataFrame({spec.id: ids, spec.label: [1] * len(ids)}).to_csv(source, index=False)
    return lab.import_labels(source, spec, settings.paths.labels, when).path


@pytest.fixture
def written(tmp_path) -> tuple[Path, dict]:
    """A home with old and fresh predictions, a dead letter and labels, all written by the real code."""
    settings = _settings(tmp_path, "30d")
    folder = settings.paths.predictions
    _log_at(folder, OLD, "old-1")
    _log_at(folder, OLD + timedelta(hours=1), "old-2")
    _log_at(folder, FRESH, "fresh")
    _log_at(folder, OLD, "old-dead", broken=True)
    files = {"old_labels": _labels_at(settings, OLD, ["old-1", "old-2"], tmp_path),
             "fresh_labels": _labels_at(settings, FRESH, ["fresh"], tmp_path)}
    return tmp_path, files


def test_retention_deletes_what_is_older_than_the_period_and_keeps_the_rest(written):
    tmp_path, files = written
    settings = _settings(tmp_path, "30d")
    paths = settings.paths
    assert sorted(read_prediction_log(paths.predictions).frame["request_id"]) == ["fresh", "old-1", "old-2"]

    outcome = stages.retention_stage(settings, settings.spec, now=NOW)

    assert [Path(h).relative_to(paths.predictions).as_posix() for h in outcome.prediction_hours] == [
        f"predict/date={OLD:%Y-%m-%d}/hour={OLD:%H}", f"predict/date={OLD:%Y-%m-%d}/hour={OLD.hour + 1:02d}"]
    assert outcome.label_files == [str(files["old_labels"])]
    assert [Path(p).parent.name for p in outcome.other_files] == [DEAD_LETTER]
    assert not (paths.predictions / "predict" / f"date={OLD:%Y-%m-%d}").exists()  # the emptied day too
    assert read_prediction_log(paths.predictions).frame["request_id"].tolist() == ["fresh"]
    known, _ = lab.read_labels(paths.labels, settings.spec, paths.quarantine)
    assert known[settings.spec.id].tolist() == ["fresh"] and files["fresh_labels"].exists()
    assert "retention 30 days: deleted 2 prediction hour(s), 1 label file(s) and 1 other file(s)" in outcome.summary()

    again = stages.retention_stage(settings, settings.spec, now=NOW)  # nothing left to delete
    assert again.prediction_hours == again.label_files == again.other_files == []


def test_an_hour_is_kept_until_all_of_it_is_older_than_the_period(written):
    tmp_path, _ = written
    settings = _settings(tmp_path, "30d")
    # The cutoff falls inside the fresh record's hour: not one of its rows is old enough yet.
    outcome = stages.retention_stage(settings, settings.spec, now=FRESH + timedelta(days=30, minutes=1))
    assert len(outcome.prediction_hours) == 2
    assert read_prediction_log(settings.paths.predictions).frame["request_id"].tolist() == ["fresh"]


def test_without_a_retention_nothing_is_deleted(written):
    tmp_path, files = written
    settings = _settings(tmp_path, None)
    outcome = stages.retention_stage(settings, settings.spec, now=NOW + timedelta(days=3650))
    assert outcome.retention is None and "everything is kept" in outcome.summary()
    assert len(read_prediction_log(settings.paths.predictions).frame) == 3 and files["old_labels"].exists()
