"""Personal data in the prediction log: a `pii: true` column never reaches a file raw (not the parquet
log, not the dead-letter folder), one value always gives one token, pii numbers are left out."""

from __future__ import annotations

import json
import stat

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from sluicegate.config import HomePaths
from sluicegate.features.inputs import INPUT_PREFIX, logged_inputs, tensor_widths
from sluicegate.serve import privacy
from sluicegate.serve.predlog import DEAD_LETTER, PredictionLog, Record
from sluicegate.spec import DEFAULT_SPEC_PATH, parse_spec

PII = ("transaction_id", "customer_id", "amount", "country")
SECRET_ID, SECRET_CUSTOMER, SECRET_AMOUNT = "txn-secret-0001", 987654321, 4321.75


@pytest.fixture
def pii_spec():
    raw = yaml.safe_load(DEFAULT_SPEC_PATH.read_text())
    for name in PII:
        raw["columns"][name]["pii"] = True
    return parse_spec(raw)


def _fields(i: int, customer: int, country: str, amount: float) -> dict:
    return {"customer_id": customer, "merchant_id": 7, "amount": amount, "channel": "online", "country": country,
            "device": "web", "merchant_category": "travel", "event_timestamp": f"2026-03-0{i + 1}T10:00:00+00:00"}


def _record(spec, rows: list[dict], ids: list, probs=None) -> Record:
    """A /predict record as the server builds it: the request fields, an online feature, the tensors."""
    n = len(rows)
    numeric, categorical = tensor_widths(spec)
    features = {name: [r[name] for r in rows] for name in rows[0]}
    features["cust_txn_count_1h"] = np.arange(n, dtype=float)
    features["numeric"] = np.full((n, numeric), 0.5)
    features["numeric"][:, logged_inputs(spec)["numeric"].index(INPUT_PREFIX + "amount")] = np.log1p(SECRET_AMOUNT)
    features["categorical"] = np.full((n, categorical), 10, dtype=np.int64)
    probs = np.full(n, 0.2) if probs is None else probs
    return Record("predict", 1.7e9, "m", "1", ids, [0.5] * len(ids), [1] * len(ids), probs, features, 0.5)


def _write(spec, folder, records, paths):
    log = PredictionLog(folder, max_queue=100, flush_seconds=3600, expand=logged_inputs(spec),
                        redact=privacy.log_redactor(spec, paths))
    for record in records:
        log.put(record)
    log.close()
    return log


def test_pii_never_reaches_the_log_or_the_dead_letters_raw_and_one_value_is_one_token(tmp_path, pii_spec):
    paths = HomePaths(tmp_path / "home", pii_spec.name)
    rows = [_fields(0, SECRET_CUSTOMER, "NG", SECRET_AMOUNT), _fields(1, SECRET_CUSTOMER, "NG", SECRET_AMOUNT),
            _fields(2, 5, "US", 10.0)]
    good = _record(pii_spec, rows, [SECRET_ID, SECRET_ID, "other"])
    # Three rows but the probabilities of two: it cannot become a table, so it is dead-lettered.
    broken = _record(pii_spec, rows, [SECRET_ID, SECRET_ID, "other"], probs=np.full(2, 0.2))
    folder = tmp_path / "predictions"
    log = _write(pii_spec, folder, [good, broken], paths)
    assert log.unlogged == 2

    frame = pd.read_parquet(folder / "predict")
    tokens = privacy.Pseudonyms(privacy.home_key(paths.pii_key))
    assert frame["request_id"].tolist() == tokens.tokens([SECRET_ID, SECRET_ID, "other"])
    assert frame["customer_id"].tolist() == tokens.tokens([SECRET_CUSTOMER, SECRET_CUSTOMER, 5])
    assert frame["country"].tolist() == tokens.tokens(["NG", "NG", "US"])
    assert frame["country"][0] == frame["country"][1] != frame["country"][2]  # the monitor can count them
    assert not {"amount", INPUT_PREFIX + "amount", INPUT_PREFIX + "country"} & set(frame.columns)
    assert frame["merchant_id"].tolist() == [7, 7, 7] and frame["channel"].tolist() == ["online"] * 3
    assert INPUT_PREFIX + "channel" in frame.columns and "cust_txn_count_1h" in frame.columns

    files = [p for p in folder.rglob("*") if p.is_file()]
    assert {p.parent.name for p in files} >= {DEAD_LETTER}
    for path in files:
        values = {v for column in pq.read_table(path).columns for v in column.to_pylist()} \
            if path.suffix == ".parquet" else set()
        data = path.read_bytes()
        assert not values & {SECRET_ID, SECRET_CUSTOMER, SECRET_AMOUNT, "NG", str(SECRET_CUSTOMER)}, path
        for raw in (SECRET_ID.encode(), str(SECRET_CUSTOMER).encode(), np.int64(SECRET_CUSTOMER).tobytes(),
                    np.float64(SECRET_AMOUNT).tobytes(), np.float64(np.log1p(SECRET_AMOUNT)).tobytes()):
            assert raw not in data, (path, raw)
    lines = [json.loads(line) for p in (folder / DEAD_LETTER).glob("*.jsonl") for line in p.read_text().splitlines()]
    assert [line["request_ids"] for line in lines] == [tokens.tokens([SECRET_ID, SECRET_ID, "other"])]
    features = lines[0]["features"]
    assert "amount" not in features and features["country"] == tokens.tokens(["NG", "NG", "US"])
    assert features["numeric"] == features["categorical"] == privacy.WITHHELD


def test_the_key_is_made_once_private_and_refused_when_damaged(tmp_path):
    path = tmp_path / "home" / "pii.key"
    key = privacy.home_key(path)
    assert len(key) == privacy.KEY_BYTES and privacy.home_key(path) == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["pii.key"]  # no temporary file left behind
    path.write_bytes(b"short")
    with pytest.raises(privacy.PiiKeyError, match="restore it from a backup"):
        privacy.home_key(path)


def test_one_value_written_any_way_is_one_token():
    tokens = privacy.Pseudonyms(b"k" * privacy.KEY_BYTES)
    assert tokens.token(42) == tokens.token("42") == tokens.token(42.0) == tokens.token(np.int64(42))
    assert tokens.token(None) is None and tokens.token(float("nan")) is None
    assert tokens.token("42") != privacy.Pseudonyms(b"j" * privacy.KEY_BYTES).token("42")
    assert len(tokens.token("a")) == privacy.TOKEN_CHARS


def test_numbers_are_dropped_ids_keys_and_categories_hashed(pii_spec):
    assert privacy.dropped_columns(pii_spec) == ["amount"]
    assert privacy.hashed_columns(pii_spec) == ["transaction_id", "customer_id", "country"]
    assert privacy.unreadable_columns(pii_spec) == ["transaction_id", "customer_id", "amount"]
    assert privacy.dropped_inputs(pii_spec) == {"numeric": {INPUT_PREFIX + "amount"},
                                                "categorical": {INPUT_PREFIX + "country"}}


def test_a_spec_without_pii_makes_no_key_and_logs_as_before(tmp_path, spec):
    paths = HomePaths(tmp_path / "home", spec.name)
    assert privacy.log_redactor(spec, paths) is None and privacy.pseudonyms(spec, paths) is None
    assert not paths.pii_key.exists()


def test_the_monitor_reads_a_pii_category_back_and_leaves_other_tokens(pii_spec):
    tokens = privacy.Pseudonyms(b"k" * privacy.KEY_BYTES)
    log = pd.DataFrame({"country": tokens.tokens(["NG", "US", None]) + ["not-a-token"],
                        "customer_id": tokens.tokens([1, 2, 3, 4])})
    read = privacy.categories_from_tokens(log, pii_spec, tokens)
    assert read["country"].tolist()[:2] == ["NG", "US"] and pd.isna(read["country"][2])
    assert read["country"][3] == "not-a-token" and read["customer_id"].equals(log["customer_id"])
