"""Serving pieces on their own: v2 parsing, /predict validation, batching, model checks, log, repository."""

from __future__ import annotations

import asyncio
import hashlib
import pickle
import time

import numpy as np
import pandas as pd
import pytest

from sluicegate.features.inputs import cardinalities, numeric_inputs, tensor_widths
from sluicegate.serve import predict as business
from sluicegate.serve import predlog, v2
from sluicegate.serve.batcher import MicroBatcher
from sluicegate.serve.errors import BadRequest
from sluicegate.serve.predlog import PredictionLog, Record
from sluicegate.ship import model_repository
from sluicegate.ship.loader import ModelRejected, load_from_bytes
from sluicegate.spec import load_spec


@pytest.fixture
def cards(spec):
    return cardinalities(spec)



WIDTH = 18  # numeric inputs of the default spec
NAMES = numeric_inputs(load_spec())


def _v2_json(rows=2, **override):
    numeric = {"name": "numeric", "shape": [rows, WIDTH], "datatype": "FP32", "data": [0.5] * (WIDTH * rows)}
    categorical = {"name": "categorical", "shape": [rows, 4], "datatype": "INT64", "data": [1] * (4 * rows)}
    body = {"inputs": [numeric, categorical], **override}
    return body


def test_v2_json_request_parses_to_model_tensors(cards):
    import orjson
    request = v2.parse_infer(orjson.dumps(_v2_json(3, id="r1")), None, NAMES, cards, 100)
    assert request.numeric.shape == (3, WIDTH) and request.numeric.dtype == np.float32
    assert request.categorical.shape == (3, 4) and request.categorical.dtype == np.int64
    assert request.id == "r1" and request.binary_output is False


def test_v2_binary_tensor_extension_round_trips(cards):
    import orjson
    numeric = np.arange(2 * WIDTH, dtype=np.float32).reshape(2, WIDTH)
    categorical = np.array([[1, 2, 3, 4], [0, 1, 2, 3]], dtype=np.int64)
    header = orjson.dumps({"inputs": [
        {"name": "numeric", "shape": [2, WIDTH], "datatype": "FP32", "parameters": {"binary_data_size": 8 * WIDTH}},
        {"name": "categorical", "shape": [2, 4], "datatype": "INT64", "parameters": {"binary_data_size": 64}}],
        "outputs": [{"name": "probability", "parameters": {"binary_data": True}}]})
    body = header + numeric.tobytes() + categorical.tobytes()
    request = v2.parse_infer(body, str(len(header)), NAMES, cards, 100)
    np.testing.assert_array_equal(request.numeric, numeric)
    np.testing.assert_array_equal(request.categorical, categorical)
    out, headers = v2.infer_response("m", "1", None, np.array([0.25, 0.5], np.float32), request.binary_output)
    n = int(headers["inference-header-content-length"])
    assert orjson.loads(out[:n])["outputs"][0]["parameters"]["binary_data_size"] == 8
    np.testing.assert_array_equal(np.frombuffer(out[n:], np.float32), [0.25, 0.5])


@pytest.mark.parametrize("mutate, says", [
    (lambda b: b.update(extra=1), "unknown field"),
    (lambda b: b["inputs"][0].update(datatype="FP64"), "datatype FP32"),
    (lambda b: b["inputs"][0].update(shape=[2, 11]), "shape"),
    (lambda b: b["inputs"][0].update(data=["a"] * 2 * WIDTH), "must be numbers"),
    (lambda b: b["inputs"][1].update(data=[1.5] * 8), "must be integers"),
    (lambda b: b["inputs"][1].update(data=[99] * 8), "codes must lie in"),
    (lambda b: b["inputs"][0].update(data=[0.5] * 23), "has 23 values"),
    (lambda b: b["inputs"][0].update(data=[1e39] * 2 * WIDTH), "finite"),
    (lambda b: b["inputs"].pop(), "missing input"),
    (lambda b: b["inputs"].append(dict(b["inputs"][0])), "given twice"),
    (lambda b: b["inputs"][1].update(shape=[1, 4], data=[1] * 4), "batch size"),
    (lambda b: b["inputs"][0].update(name="nope"), "unknown input"),
    (lambda b: b.update(outputs=[{"name": "logit"}]), "unknown output"),
])
def test_v2_rejects_each_bad_request_with_a_message(cards, mutate, says):
    import orjson
    body = _v2_json()
    mutate(body)
    with pytest.raises(BadRequest, match=says) as err:
        v2.parse_infer(orjson.dumps(body), None, NAMES, cards, 100)
    assert err.value.status == 400


def test_v2_row_limit_and_malformed_json(cards):
    import orjson
    with pytest.raises(BadRequest, match="rows <= 2"):
        v2.parse_infer(orjson.dumps(_v2_json(3)), None, NAMES, cards, 2)
    with pytest.raises(BadRequest, match="not valid JSON"):
        v2.parse_infer(b"{nope", None, NAMES, cards, 2)


def _tensor_fields_body(spec, **numeric_override) -> dict:
    """A valid one-row v2 body for the default spec, with fields of the numeric tensor replaced."""
    from sluicegate.features.inputs import numeric_inputs

    width, codes = len(numeric_inputs(spec)), len(cardinalities(spec))
    numeric = {"name": "numeric", "shape": [1, width], "datatype": "FP32", "data": [0.5] * width}
    categorical = {"name": "categorical", "shape": [1, codes], "datatype": "INT64", "data": [1] * codes}
    return {"inputs": [{**numeric, **numeric_override}, categorical]}


# Found by schemathesis's coverage phase: a tensor `name` that is an object answered 500
# (an unhashable dict looked up among the input names). Every field of a tensor, any JSON type.
@pytest.mark.parametrize("field, value, says", [
    ("name", {}, "'name' must be a string"),
    ("name", {"numeric": 1}, "'name' must be a string"),
    ("name", ["numeric"], "'name' must be a string"),
    ("name", [], "'name' must be a string"),
    ("name", 1, "'name' must be a string"),
    ("name", None, "'name' must be a string"),
    ("datatype", {}, "'datatype' must be the string 'FP32'"),
    ("datatype", ["FP32"], "'datatype' must be the string 'FP32'"),
    ("datatype", 32, "'datatype' must be the string 'FP32'"),
    ("datatype", None, "'datatype' must be the string 'FP32'"),
    ("shape", {}, "shape must be"),
    ("shape", "1x14", "shape must be"),
    ("shape", [1], "shape must be"),
    ("shape", [1, "14"], "shape must be"),
    ("shape", [1.0, 14], "shape must be"),
    ("shape", [True, 14], "shape must be"),
    ("shape", [[1], 14], "shape must be"),
    ("shape", [{}, 14], "shape must be"),
    ("shape", [-1, 14], "1 <= rows"),
    ("data", {}, "needs 'data'"),
    ("data", "0.5", "needs 'data'"),
    ("data", [{}], "must be numbers"),
    ("data", [None], "must be numbers"),
    ("data", [[0.5], [0.5, 0.5]], "ragged"),
    ("parameters", [], "'parameters' of input 'numeric' must be an object"),
    ("parameters", "x", "'parameters' of input 'numeric' must be an object"),
])
def test_v2_every_malformed_tensor_field_is_a_400(spec, cards, field, value, says):
    import orjson

    from sluicegate.features.inputs import numeric_inputs

    body = _tensor_fields_body(spec, **{field: value})
    with pytest.raises(BadRequest, match=says) as err:
        v2.parse_infer(orjson.dumps(body), None, numeric_inputs(spec), cards, 100)
    assert err.value.status == 400


@pytest.mark.parametrize("size", [{}, [56], "56", "a float", True, None])
def test_v2_binary_data_size_must_be_an_integer(spec, cards, size):
    """A float size equal to the right byte count once slipped through and failed later, in numpy (500)."""
    import orjson

    from sluicegate.features.inputs import numeric_inputs

    names = numeric_inputs(spec)
    nbytes = 4 * len(names)
    numeric = {"name": "numeric", "shape": [1, len(names)], "datatype": "FP32",
               "parameters": {"binary_data_size": float(nbytes) if size == "a float" else size}}
    categorical = {"name": "categorical", "shape": [1, len(cards)], "datatype": "INT64",
                   "parameters": {"binary_data_size": 8 * len(cards)}}
    header = orjson.dumps({"inputs": [numeric, categorical]})
    body = header + np.zeros(len(names), np.float32).tobytes() + np.ones(len(cards), np.int64).tobytes()
    if size is None:  # no size at all: the tensor then needs JSON data
        with pytest.raises(BadRequest, match="needs 'data'"):
            v2.parse_infer(body, str(len(header)), names, cards, 100)
        return
    with pytest.raises(BadRequest, match="binary_data_size must be an integer") as err:
        v2.parse_infer(body, str(len(header)), names, cards, 100)
    assert err.value.status == 400


def _business(**override):
    body = {"customer_id": 1, "merchant_id": 2, "amount": 10.0, "channel": "pos", "country": "US",
            "device": "ios", "merchant_category": "fuel"}
    body.update(override)
    return body


def test_predict_request_validation_lists_every_problem(spec):
    good = business.parse_predict(_business(event_timestamp="2026-10-02T03:04:05"), spec)
    assert good.fields["event_timestamp"].tzinfo is not None
    with pytest.raises(BadRequest) as err:
        business.parse_predict(_business(amount=-3, country="XX", customer_id=True, colour="red"), spec)
    assert err.value.status == 422
    fields = {d["field"] for d in err.value.details}
    assert fields == {"amount", "country", "customer_id", "colour"}
    with pytest.raises(BadRequest, match="event_timestamp"):
        business.parse_predict(_business(event_timestamp="yesterday"), spec)
    body = _business()
    del body["device"]
    with pytest.raises(BadRequest, match="device: required"):
        business.parse_predict(body, spec)


def test_predict_schema_matches_the_spec(spec):
    schema = business.request_schema(spec)
    assert schema["additionalProperties"] is False
    assert schema["properties"]["country"]["enum"] == spec.categories("country")
    assert schema["properties"]["amount"]["maximum"] == spec.columns["amount"].max


def test_model_input_is_built_by_the_training_builder(spec):
    from sluicegate.features.inputs import build_model_input, python_features
    request = business.parse_predict(_business(event_timestamp="2026-10-02T03:04:05+00:00"), spec)
    found = {"cust_txn_count_1h": np.array([1.0]), "cust_txn_count_24h": np.array([3.0]),
             "cust_amount_mean_7d": np.array([np.nan]), "cust_amount_std_7d": np.array([np.nan]),
             "cust_seconds_since_prev": np.array([720.0]), "merch_txn_count_24h": np.array([40.0]),
             "merch_fraud_rate_30d": np.array([0.01])}
    got = business.model_input([request], found, spec)
    frame = pd.DataFrame({**_business(), "event_timestamp": [pd.Timestamp("2026-10-02T03:04:05Z")],
                          **found})
    frame = frame.assign(**python_features(frame, spec))  # as the feature stage adds them in training
    want = build_model_input(frame, spec)
    np.testing.assert_array_equal(got.numeric, want.numeric)
    np.testing.assert_array_equal(got.categorical, want.categorical)


def test_batcher_shares_one_call_among_concurrent_requests():
    calls = []

    def process(payloads):
        calls.append(len(payloads))
        return [p * 2 for p in payloads]

    async def scenario():
        batcher = MicroBatcher(process, max_rows=8, max_wait_s=0.0, name="t")
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i, 1) for i in range(20)))
        await batcher.stop()
        return results

    assert asyncio.run(scenario()) == [i * 2 for i in range(20)]
    assert sum(calls) == 20 and max(calls) == 8 and len(calls) < 20


def test_batcher_failure_reaches_every_caller_and_it_keeps_working():
    def process(payloads):
        if "boom" in payloads:
            raise RuntimeError("boom")
        return payloads

    async def scenario():
        batcher = MicroBatcher(process, max_rows=4, max_wait_s=0.001, name="t", in_thread=True)
        batcher.start()
        first = await asyncio.gather(batcher.submit("boom", 1), batcher.submit("x", 1), return_exceptions=True)
        second = await batcher.submit("ok", 1)
        await batcher.stop()
        return first, second

    first, second = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) for r in first) and second == "ok"


class _Exploit:
    """Unpickling this would create a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_with_a_matching_hash_is_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    data = pickle.dumps(_Exploit(marker))
    with pytest.raises(ModelRejected, match="not a loadable ONNX model"):
        load_from_bytes("m", "1", data, hashlib.sha256(data).hexdigest(), "0.5", "fp32", 1,
                        ["CPUExecutionProvider"], (WIDTH, 4))
    assert not marker.exists()


def test_hash_mismatch_and_missing_threshold_are_refused():
    with pytest.raises(ModelRejected, match="does not match"):
        load_from_bytes("m", "1", b"abc", "0" * 64, "0.5", "fp32", 1, ["CPUExecutionProvider"], (WIDTH, 4))
    data = b"abc"
    with pytest.raises(ModelRejected, match="threshold"):
        load_from_bytes("m", "1", data, hashlib.sha256(data).hexdigest(), None, "fp32", 1,
                        ["CPUExecutionProvider"], (WIDTH, 4))


def _record(i, rows=2):
    """One model call answering one request of `rows` rows."""
    return Record("v2", 1.7e9 + i, "m", "1", [f"req-{i}"], [0.5], [rows], np.full(rows, 0.1, np.float32),
                  {"numeric": np.zeros((rows, WIDTH), np.float32), "categorical": np.ones((rows, 4), np.int64)})


def test_prediction_log_writes_every_row_by_close(tmp_path):
    log = PredictionLog(tmp_path, max_queue=1000, flush_seconds=3600,
                        expand={"numeric": [f"n{i}" for i in range(WIDTH)], "categorical": ["a", "b", "c", "d"]})
    for i in range(50):
        log.put(_record(i))
    log.close()
    frame = pd.read_parquet(tmp_path / "v2")
    assert len(frame) == 100 and frame["request_id"].nunique() == 50
    assert {"n0", "a", "probability", "model_version", "latency_ms", "ts"} <= set(frame.columns)


def test_prediction_log_spreads_a_shared_model_call_over_its_requests(tmp_path):
    errors = []
    log = PredictionLog(tmp_path, max_queue=10, flush_seconds=3600, on_error=lambda: errors.append(1))
    log.put(Record("v2", 1.7e9, "m", "1", ["a", None, "c"], [1.5, 2.5, 3.5], [2, 1, 3],
                   np.arange(6, dtype=np.float32) / 10, {"x": np.arange(6.0)}))
    log.put(Record("v2", 1.7e9, "m", "1", ["d"], [1.0], [2], np.zeros(3, np.float32), {"x": np.zeros(3)}))
    log.close()
    frame = pd.read_parquet(tmp_path / "v2")
    assert frame["request_id"].tolist() == ["a", "a", None, "c", "c", "c"]
    assert frame["row"].tolist() == [0, 1, 0, 0, 1, 2]
    assert frame["latency_ms"].tolist() == [1.5, 1.5, 2.5, 3.5, 3.5, 3.5]
    assert frame["x"].tolist() == list(np.arange(6.0))  # the record whose rows do not add up is not written
    assert errors == [1]


def test_prediction_log_writes_one_consistent_file_from_many_conversions(tmp_path):
    log = PredictionLog(tmp_path, max_queue=1000, flush_seconds=3600)
    for i, (amount, request_id) in enumerate([(3, None), (2.5, "a"), (7, None)]):
        log.put(Record("predict", 1.7e9 + i, "m", "1", [request_id], [0.5], [1], np.array([0.2], np.float32),
                       {"amount": [amount]}, threshold=0.1))
        time.sleep(predlog.POLL_SECONDS * 3)  # each record is converted on its own
    log.close()
    assert len(list((tmp_path / "predict").rglob("*.parquet"))) == 1
    frame = pd.read_parquet(tmp_path / "predict")
    assert frame["amount"].tolist() == [3.0, 2.5, 7.0] and frame["request_id"].tolist() == [None, "a", None]
    assert frame["decision"].all()


def test_prediction_log_keeps_at_most_max_queue_rows_while_the_disk_fails(tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(predlog.pq, "write_table", disk_full)
    log = PredictionLog(tmp_path, max_queue=5, flush_seconds=0.05)
    for i in range(4):
        log.put(_record(i))  # 8 rows: the queue (5 records) takes them all, a failed write keeps 5 rows
    deadline = time.monotonic() + 5
    while log.error is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "No space left" in log.error
    monkeypatch.undo()
    log.close()
    frame = pd.read_parquet(tmp_path / "v2")
    assert len(frame) == 5 and log.dropped == 3
    assert frame["request_id"].tolist() == ["req-1", "req-2", "req-2", "req-3", "req-3"]  # the newest kept
    assert log.error is None


def test_prediction_log_drops_and_counts_when_full(tmp_path):
    log = PredictionLog(tmp_path, max_queue=3, flush_seconds=3600)
    log._stop.set()  # writer exits at once; the queue can only fill
    log._thread.join()
    for i in range(5):
        log.put(_record(i))
    assert log.depth() == 3 and log.dropped == 4  # rows of the two records that did not fit


def test_model_repository_layout_and_config(tmp_path):
    model_dir = model_repository.write_version(tmp_path, "fraud-detector", "3", b"onnx-bytes", (WIDTH, 4))
    assert (model_dir / "3" / "model.onnx").read_bytes() == b"onnx-bytes"
    config = (model_dir / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "versions: [ 3 ]" in config
    assert f"dims: [ {WIDTH} ]" in config and "TYPE_INT64" in config
    model_repository.write_version(tmp_path, "fraud-detector", "2", b"older", (WIDTH, 4))  # a rollback
    assert "versions: [ 2 ]" in (model_dir / "config.pbtxt").read_text()
    with pytest.raises(ValueError):
        model_repository.write_version(tmp_path, "fraud-detector", "v1", b"x", (WIDTH, 4))


def test_metrics_stay_in_memory_when_an_import_turned_on_multiprocess_mode(tmp_path, monkeypatch):
    from prometheus_client import values

    from sluicegate.serve.metrics import Metrics

    # What `import feast` leaves behind: the env variable, and prometheus_client in mmap-file mode.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue())
    metrics = Metrics()
    metrics.observe("v2_infer", 200, 0.001)
    assert list(tmp_path.iterdir()) == []  # no value files written
    assert b'sluicegate_requests_total{code="200",endpoint="v2_infer"} 1.0' in metrics.render()


def test_the_default_spec_has_the_width_these_tests_use(spec):
    assert tensor_widths(spec) == (WIDTH, 4)


def test_prediction_log_writes_hourly_partitions_and_compacts_closed_hours(tmp_path):
    import calendar

    from sluicegate.serve.predlog import compact_hours, hour_partition

    plog = PredictionLog(tmp_path, max_queue=1000, flush_seconds=0.05)
    for i in range(3):
        plog.put(_record(i))
        time.sleep(0.2)  # one file per flush
    plog.close()
    hour = tmp_path / "v2" / hour_partition(time.time())
    parts = sorted(hour.glob("part-*.parquet"))
    assert len(parts) >= 2
    before = pd.read_parquet(tmp_path / "v2").drop(columns=["date", "hour"])
    day, hh = hour.parent.name.removeprefix("date="), int(hour.name.removeprefix("hour="))
    end = calendar.timegm(time.strptime(f"{day} {hh:02d}", "%Y-%m-%d %H")) + 3600
    assert compact_hours(tmp_path, now=end + 60) == 0  # still settling: left alone
    assert compact_hours(tmp_path, now=end + 600) == len(parts)
    assert [p.name.split("-")[0] for p in hour.iterdir()] == ["compacted"]
    after = pd.read_parquet(tmp_path / "v2").drop(columns=["date", "hour"])
    pd.testing.assert_frame_equal(after.sort_values("request_id").reset_index(drop=True),
                                  before.sort_values("request_id").reset_index(drop=True))
    assert set(after["endpoint"]) == {"v2"}
