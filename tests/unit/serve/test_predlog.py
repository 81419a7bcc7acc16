"""The prediction log never drops a row over a type: ids of any kind, columns typed two ways, and a
record that cannot become a table is kept in the dead-letter folder, counted and shown."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sluicegate.serve.predlog import DEAD_LETTER, PredictionLog, Record


def _predict(i, request_id, **fields):
    return Record("predict", 1.7e9 + i, "m", "1", [request_id], [0.5], [1], np.array([0.2], np.float32),
                  {k: [v] for k, v in fields.items()}, threshold=0.5)


def _closed_log(tmp_path, records, **kwargs) -> PredictionLog:
    log = PredictionLog(tmp_path, max_queue=1000, flush_seconds=3600, **kwargs)
    for record in records:
        log.put(record)
    log.close()
    return log


def test_int_and_string_ids_are_logged_as_their_text(tmp_path):
    log = _closed_log(tmp_path, [_predict(0, 42), _predict(1, "a-7"), _predict(2, None)])
    frame = pd.read_parquet(tmp_path / "predict")
    assert frame["request_id"].tolist() == ["42", "a-7", None]
    assert log.error is None and log.unlogged == 0


def test_a_column_typed_two_ways_is_written_as_text_in_one_record_and_across_flushes(tmp_path):
    mixed = Record("predict", 1.7e9, "m", "1", ["a", "b"], [0.5, 0.5], [1, 1], np.array([0.2, 0.3], np.float32),
                   {"grade": [3, "B"]})
    log = PredictionLog(tmp_path, max_queue=1000, flush_seconds=3600)
    log.put(mixed)
    log.put(_predict(1, "c", grade=7))
    log.close()
    frame = pd.read_parquet(tmp_path / "predict")
    assert frame["grade"].tolist() == ["3", "B", "7"] and len(frame) == 3


def test_a_record_that_cannot_become_a_table_is_dead_lettered_counted_and_shown(tmp_path):
    dropped, errors = [], []
    broken = Record("predict", 1.7e9, "m", "1", ["x"], [0.5], [2], np.array([0.1, 0.2, 0.3]), {"a": [1, 2, 3]})
    log = _closed_log(tmp_path, [broken, _predict(1, "ok")], on_drop=dropped.append,
                      on_error=lambda: errors.append(1))
    assert pd.read_parquet(tmp_path / "predict")["request_id"].tolist() == ["ok"]
    assert log.unlogged == 3 and dropped == [3] and errors == [1]
    assert "3 rows could not be logged" in log.error and DEAD_LETTER in log.error
    lines = [json.loads(line) for f in (tmp_path / DEAD_LETTER).glob("*.jsonl") for line in f.read_text().splitlines()]
    assert [(line["rows"], line["request_ids"], line["features"]["a"]) for line in lines] == [(3, ["x"], [1, 2, 3])]


def test_a_field_named_like_a_log_column_is_kept_beside_it_and_read_back_under_its_name(tmp_path):
    from sluicegate.operate.monitor import read_prediction_log

    _closed_log(tmp_path, [_predict(0, "a", ts="2018-10-30T18:08:43.152000+00:00", probability=3)])
    frame = pd.read_parquet(tmp_path / "predict")
    assert str(frame["ts"].dtype) == "datetime64[us, UTC]" and frame["probability"].tolist() == pytest.approx([0.2])
    assert frame["raw.ts"].tolist() == ["2018-10-30T18:08:43.152000+00:00"]
    read = read_prediction_log(tmp_path).frame
    assert read["ts"].tolist() == ["2018-10-30T18:08:43.152000+00:00"] and read["probability"].tolist() == [3]
    assert read["score"].tolist() == pytest.approx([0.2]) and read["logged_at"].dt.year.tolist() == [2023]


def test_records_of_two_input_contracts_in_one_flush_are_both_logged_under_their_own_columns(tmp_path):
    """A champion with another input contract takes over between two flushes' records."""

    def call(version, width, expand):
        return Record("predict", 1.7e9, "m", version, ["r"], [0.5], [1], np.array([0.4], np.float32),
                      {"numeric": np.ones((1, width), np.float32)}, 0.5, {"numeric": expand})

    log = _closed_log(tmp_path, [call("1", 2, ["input.a", "input.b"]), call("2", 1, ["input.c"])])
    frame = pd.read_parquet(tmp_path / "predict").set_index("model_version")
    assert log.unlogged == 0 and len(frame) == 2
    assert frame.loc["1", ["input.a", "input.b"]].tolist() == [1.0, 1.0] and pd.isna(frame.loc["1", "input.c"])
    assert frame.loc["2", "input.c"] == 1.0 and pd.isna(frame.loc["2", "input.a"])
