"""The model server for real: uvicorn on loopback, MLflow on SQLite, Feast local, tritonclient.

One small champion is trained and registered once for the module (no Prefect:
the stage functions run directly); tests that move the champion run last.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest

from sluicegate.config import Settings, ensure_home
from sluicegate.data.synthetic import GenerateConfig, generate_transactions
from sluicegate.features import aggregates, catalog
from sluicegate.features import stages as features_stages
from sluicegate.features.inputs import build_model_input, numeric_inputs, python_features
from sluicegate.runtime import make_session, onnx_predict, sha256_file
from sluicegate.serve import ServeSettings, create_app
from sluicegate.serve.app import uvicorn_config
from sluicegate.ship import registry
from sluicegate.ship.export import export_onnx
from sluicegate.spec import load_spec
from sluicegate.train import stages as train_stages
from sluicegate.train.config import TrainConfig

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "fraud-detector"
WIDTH = len(numeric_inputs(load_spec()))  # the default spec's numeric inputs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A SLUICEGATE_HOME with Feast features online and a registered, promoted champion."""
    from tests.conftest import REPO
    home = tmp_path_factory.mktemp("serving") / "home"
    env = {"SLUICEGATE_HOME": str(home), "SLUICEGATE_GATES_PATH": str(REPO / "gates.yaml"),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    settings = Settings()
    ensure_home(settings.paths)
    spec = load_spec()
    frame = generate_transactions(GenerateConfig(rows=4000, days=4, seed=11), spec)
    feats = features_stages.feature_stage(settings, spec, frame)
    prepared = train_stages.prepare(feats.frame, spec)
    trained = train_stages.train_stage(prepared, spec, TrainConfig(max_epochs=1, hidden=16, device="cpu",
                                                               precision="fp32"), home / "ckpt")
    onnx_path = export_onnx(trained.model, prepared.train, home / "work" / "model.onnx")
    client = registry.configure(settings)
    with mlflow.start_run() as run:
        info = registry.log_onnx_model(onnx_path)
        version = registry.register_candidate(client, NAME, info, run.info.run_id, onnx_path,
                                              {"threshold": "0.3", "variant": "fp32"})
    client.set_registered_model_alias(NAME, registry.CHAMPION, version.version)
    yield {"home": home, "settings": settings, "spec": spec, "frame": frame, "onnx": onnx_path,
           "client": client}
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A real uvicorn server in a thread of this process (so a test can inject a fault)."""

    def __init__(self, settings: Settings, **overrides):
        import uvicorn
        given = {"port": _free_port(), "poll_interval_s": 0.2, "api_keys": KEY, "max_body_bytes": 65536,
                 "max_rows_per_request": 100, "log_flush_s": 0.2}
        serve = ServeSettings(**{**given, **overrides})
        self.app = create_app(settings, serve)
        self.server = uvicorn.Server(uvicorn_config(self.app, serve))
        self.url = f"http://127.0.0.1:{serve.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def server(world):
    running = Running(world["settings"])
    yield running
    running.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def _infer_body(rows=1, seed=0):
    rng = np.random.default_rng(seed)
    return {"inputs": [
        {"name": "numeric", "shape": [rows, WIDTH], "datatype": "FP32",
         "data": rng.normal(size=rows * WIDTH).astype(np.float32).tolist()},
        {"name": "categorical", "shape": [rows, 4], "datatype": "INT64", "data": [1, 2, 3, 4] * rows}]}


def _business(row: pd.Series) -> dict:
    return {"transaction_id": str(row["transaction_id"]), "customer_id": int(row["customer_id"]),
            "merchant_id": int(row["merchant_id"]), "amount": float(row["amount"]), "channel": row["channel"],
            "country": row["country"], "device": row["device"], "merchant_category": row["merchant_category"],
            "event_timestamp": pd.Timestamp(row["event_timestamp"]).isoformat()}


def _wait_for(predicate, what: str, seconds: float = 60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


# ------------------------------------------------------------------ protocol

def test_v2_through_tritonclient_matches_onnxruntime(server, world):
    import tritonclient.http as triton
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(NAME)
    meta = client.get_model_metadata(NAME)
    assert [i["name"] for i in meta["inputs"]] == ["numeric", "categorical"]
    rng = np.random.default_rng(3)
    numeric = rng.normal(size=(5, WIDTH)).astype(np.float32)
    categorical = rng.integers(0, 4, size=(5, 4)).astype(np.int64)
    expected = make_session(world["onnx"]).run(["probability"], {"numeric": numeric,
                                                                 "categorical": categorical})[0].reshape(-1)
    for binary in (True, False):  # the binary tensor extension (default) and plain JSON
        a = triton.InferInput("numeric", [5, WIDTH], "FP32")
        a.set_data_from_numpy(numeric, binary_data=binary)
        b = triton.InferInput("categorical", [5, 4], "INT64")
        b.set_data_from_numpy(categorical, binary_data=binary)
        out = triton.InferRequestedOutput("probability", binary_data=binary)
        # A fresh dict: tritonclient adds its own headers to the one it is given.
        result = client.infer(NAME, [a, b], outputs=[out], headers=dict(AUTH))
        np.testing.assert_allclose(result.as_numpy("probability"), expected, rtol=1e-5, atol=1e-6)
        assert result.get_response()["model_version"] == "1"
    client.close()


def test_health_metadata_openapi_and_metrics(http):
    assert http.get("/v2/health/live").json() == {"live": True}
    assert http.get("/v2/health/ready").status_code == 200
    assert http.get(f"/v2/models/{NAME}/versions/1/ready").status_code == 200
    doc = http.get("/openapi.json").json()
    assert {"/v2/models/{name}/infer", "/predict", "/metrics"} <= set(doc["paths"])
    http.post(f"/v2/models/{NAME}/infer", json=_infer_body(), headers=AUTH)
    text = http.get("/metrics").text
    for name in ("sluicegate_requests_total", "sluicegate_request_latency_seconds_bucket",
                 "sluicegate_batch_rows_bucket", "sluicegate_model_version"):
        assert name in text
    assert f'sluicegate_model_version{{model="{NAME}"}} 1.0' in text


def test_model_repository_exported_for_the_champion(server, world):
    repo = world["settings"].paths.model_repository / NAME
    assert (repo / "1" / "model.onnx").read_bytes() == world["onnx"].read_bytes()
    assert "versions: [ 1 ]" in (repo / "config.pbtxt").read_text()


def test_concurrent_requests_share_model_calls(server):
    async def burst():
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            bodies = [_infer_body(seed=i) for i in range(64)]
            return await asyncio.gather(*(client.post(f"/v2/models/{NAME}/infer", json=b, headers=AUTH)
                                          for b in bodies))
    answers = asyncio.run(burst())
    assert all(a.status_code == 200 for a in answers)
    with httpx.Client(base_url=server.url) as http:
        text = http.get("/metrics").text
    count = _metric(text, 'sluicegate_batch_rows_count{endpoint="v2_infer"}')
    rows = _metric(text, 'sluicegate_batch_rows_sum{endpoint="v2_infer"}')
    assert rows > count  # some calls carried more than one request


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


# ------------------------------------------------------------------ /predict through the online state

def test_predict_end_to_end_through_the_online_state(http, world):
    """A new event of a known customer and merchant: its aggregates as training computes them (the
    batch as its history), the model's answer on them, and the event counted for the next request."""
    spec, frame = world["spec"], world["frame"]
    last = frame.iloc[-1]
    when = pd.Timestamp(last["event_timestamp"]) + pd.Timedelta(minutes=5)
    body = {**_business(last), "transaction_id": "online-1", "event_timestamp": when.isoformat()}
    answer = http.post("/predict", json=body, headers=AUTH)
    assert answer.status_code == 200, answer.text
    got = answer.json()
    row = pd.DataFrame([{**body, "event_timestamp": when, spec.label: 0}])
    found = aggregates.compute_feature_tables(row, spec, history=frame)
    model_frame = row
    for entity in catalog.served_entities(spec):
        model_frame = model_frame.merge(found[catalog.entity_view(entity)], on=[spec.entities[entity].key,
                                                                                spec.timestamp])
    assert model_frame["cust_txn_count_24h"].iloc[0] >= 1  # the customer's history reaches the request
    model_frame = model_frame.assign(**python_features(model_frame, spec))
    expected = onnx_predict(make_session(world["onnx"]), build_model_input(model_frame, spec))[0]
    assert got["probability"] == pytest.approx(float(expected), abs=1e-6)
    assert got["positive"] == (got["probability"] >= 0.3) and got["threshold"] == pytest.approx(0.3)
    assert got["model_version"] == "1" and got["id"] == body["transaction_id"]
    again = http.post("/predict", json={**body, "transaction_id": "online-2",
                                         "event_timestamp": (when + pd.Timedelta(seconds=1)).isoformat()},
                      headers=AUTH)
    assert again.status_code == 200 and again.json()["probability"] != got["probability"]  # one more event counted


def test_a_retried_request_is_answered_alike_and_counted_once(http, server, world):
    when = pd.Timestamp(world["frame"]["event_timestamp"].max()) + pd.Timedelta(minutes=20)
    body = {**_business(world["frame"].iloc[-2]), "transaction_id": "retry-1", "customer_id": 10**9 + 5,
            "event_timestamp": when.isoformat()}
    answers = [http.post("/predict", json=body, headers=AUTH) for _ in range(3)]
    assert {a.status_code for a in answers} == {200} and len({a.json()["probability"] for a in answers}) == 1
    held = server.app.default.online_state().read({("customer", str(10**9 + 5)): ["retry-1"]})
    assert len(held[("customer", str(10**9 + 5))].ts) == 1 and held[("customer", str(10**9 + 5))].holds("retry-1")


def test_an_event_older_than_the_online_state_keeps_gets_a_422(http, world):
    body = {**_business(world["frame"].iloc[-1]), "transaction_id": "ancient",
            "event_timestamp": "2020-01-01T00:00:00+00:00"}
    answer = http.post("/predict", json=body, headers=AUTH)
    assert answer.status_code == 422 and "older than the online state keeps" in answer.json()["error"]


def test_predict_for_an_unseen_customer_uses_defaults(http, world):
    body = {**_business(world["frame"].iloc[0]), "customer_id": 10**12, "merchant_id": 10**12}
    answer = http.post("/predict", json=body, headers=AUTH)
    assert answer.status_code == 200 and 0.0 <= answer.json()["probability"] <= 1.0


def test_online_store_down_gives_503_counts_nothing_then_recovers(http, server, world):
    body = {**_business(world["frame"].iloc[1]), "transaction_id": "down-1"}
    assert http.post("/predict", json=body, headers=AUTH).status_code == 200
    state = server.app.default.online_state()
    before = state.stats()

    def down(*args, **kwargs):  # injected fault: the online store refuses connections
        raise ConnectionError("connection refused")

    state.read = down
    try:
        answer = http.post("/predict", json={**body, "transaction_id": "down-2"}, headers=AUTH)
        assert answer.status_code == 503 and "online feature store unavailable" in answer.json()["error"]
        assert http.get("/v2/health/ready").status_code == 200  # the v2 path does not need the online state
    finally:
        del state.read
    assert state.stats() == before  # the refused request was not counted
    assert http.post("/predict", json=body, headers=AUTH).status_code == 200


# ------------------------------------------------------------------ safety

def test_auth_is_required_on_inference_only(http):
    for path, body in ((f"/v2/models/{NAME}/infer", _infer_body()), ("/predict", {})):
        assert http.post(path, json=body).status_code == 401
        denied = http.post(path, json=body, headers={"Authorization": "Bearer wrong"})
        assert denied.status_code == 401 and "API key" in denied.json()["error"]
    assert http.post(f"/v2/models/{NAME}/infer", json=_infer_body(), headers={"X-API-Key": KEY}).status_code == 200
    assert http.get("/v2/health/ready").status_code == 200 and http.get("/metrics").status_code == 200


def _bad_v2(mutate):
    body = _infer_body(rows=2)
    mutate(body)
    return body


BAD = [
    ("v2", b"{not json", 400, "not valid JSON"),
    ("v2", _bad_v2(lambda b: b.update(colour="red")), 400, "unknown field"),
    ("v2", _bad_v2(lambda b: b["inputs"][0].update(datatype="INT64")), 400, "datatype FP32"),
    ("v2", _bad_v2(lambda b: b["inputs"][0].update(shape=[2, 13])), 400, "shape"),
    ("v2", _bad_v2(lambda b: b["inputs"][0].update(data=["x"] * 24)), 400, "must be numbers"),
    ("v2", _bad_v2(lambda b: b["inputs"][1].update(data=[-1] * 8)), 400, "codes must lie in"),
    ("v2", _bad_v2(lambda b: b["inputs"].pop()), 400, "missing input"),
    ("v2", _infer_body(rows=101), 400, "rows <= 100"),
    ("v2", b"x" * 70000, 413, "exceeds the limit"),
    ("predict", b"[1, 2", 400, "not valid JSON"),
    ("predict", {"customer_id": 1}, 422, "required"),
    ("predict", {"amount": "ten"}, 422, "amount: must be a finite number"),
    ("predict", {"amount": 1e9}, 422, "amount: must be <="),
    ("predict", {"channel": "fax"}, 422, "channel: must be one of"),
    ("predict", {"customer_id": 1.5}, 422, "customer_id: must be a 64-bit integer"),
    ("predict", {"colour": "red"}, 422, "colour: unknown field"),
    ("predict", {"event_timestamp": "soon"}, 422, "event_timestamp"),
]


@pytest.mark.parametrize("endpoint, body, status, says", BAD)
def test_bad_requests_get_a_4xx_that_says_why_and_the_server_stays_healthy(http, world, endpoint, body, status,
                                                                           says):
    path = f"/v2/models/{NAME}/infer" if endpoint == "v2" else "/predict"
    if endpoint == "predict" and isinstance(body, dict) and "customer_id" not in body or body == {"customer_id": 1.5}:
        body = {**_business(world["frame"].iloc[0]), **body}
    content = body if isinstance(body, bytes) else None
    answer = http.post(path, content=content, json=None if content else body, headers=AUTH)
    assert answer.status_code == status, answer.text
    assert says in answer.json()["error"]
    assert http.get("/v2/health/ready").status_code == 200
    assert http.post(f"/v2/models/{NAME}/infer", json=_infer_body(), headers=AUTH).status_code == 200


def test_unknown_model_version_and_method(http):
    assert http.post("/v2/models/other/infer", json=_infer_body(), headers=AUTH).status_code == 404
    assert http.get(f"/v2/models/{NAME}/versions/99").status_code == 404
    assert http.get(f"/v2/models/{NAME}/infer").status_code == 405


# ------------------------------------------------------------------ prediction log

def test_prediction_log_is_complete_after_shutdown(world):
    running = Running(world["settings"], log_flush_s=3600)  # nothing is written before shutdown
    tag = f"log-{time.time_ns()}"
    with httpx.Client(base_url=running.url, timeout=30) as http:
        for i in range(40):
            body = {**_infer_body(rows=2, seed=i), "id": f"{tag}-{i}"}
            assert http.post(f"/v2/models/{NAME}/infer", json=body, headers=AUTH).status_code == 200
        business = {**_business(world["frame"].iloc[2]), "transaction_id": f"{tag}-p"}
        assert http.post("/predict", json=business, headers=AUTH).status_code == 200
    running.stop()
    folder = world["settings"].paths.predictions
    v2_log = pd.read_parquet(folder / "v2")
    mine = v2_log[v2_log["request_id"].str.startswith(tag, na=False)]
    assert len(mine) == 80 and mine["request_id"].nunique() == 40
    assert mine["model_version"].eq("1").all() and mine["latency_ms"].gt(0).all()
    # v2 rows hold the model inputs under input.<name>, never under a raw column's name.
    assert mine["input.amount"].notna().all() and "amount" not in mine and mine["probability"].between(0, 1).all()
    predict_log = pd.read_parquet(folder / "predict")
    row = predict_log[predict_log["request_id"] == f"{tag}-p"]
    assert len(row) == 1 and row["customer_id"].iloc[0] == business["customer_id"]
    assert "cust_txn_count_24h" in row and "input.cust_txn_count_24h" in row and row["decision"].notna().all()


# ------------------------------------------------------------------ hot reload (moves the champion: last)

def _register_file(world, data: bytes, sha: str, threshold: str = "0.3") -> tuple[str, Path]:
    """A version whose artifact folder holds `data` as model.onnx, with the given sha256 tag."""
    client, tmp = world["client"], world["home"] / "work" / f"v{time.time_ns()}"
    tmp.mkdir(parents=True)
    (tmp / "model.onnx").write_bytes(data)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp / "model.onnx"), artifact_path="model")
    version = client.create_model_version(NAME, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
                                          tags={"sha256": sha, "threshold": threshold, "variant": "fp32"})
    stored = Path(mlflow.get_run(run.info.run_id).info.artifact_uri.removeprefix("file://")) / "model" / "model.onnx"
    return str(version.version), stored


def test_hot_reload_under_load_with_zero_failures(server, world):
    data = world["onnx"].read_bytes()
    new_version, _ = _register_file(world, data, sha256_file(world["onnx"]))
    statuses, versions, stop = [], set(), threading.Event()

    def load():
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                answer = http.post(f"/v2/models/{NAME}/infer", json=_infer_body(), headers=AUTH)
                statuses.append(answer.status_code)
                if answer.status_code == 200:
                    versions.add(answer.json()["model_version"])

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        _wait_for(lambda: len(statuses) > 50, "load to start")
        world["client"].set_registered_model_alias(NAME, registry.CHAMPION, new_version)
        _wait_for(lambda: new_version in versions, "the new champion to serve")
        seen = len(statuses)
        _wait_for(lambda: len(statuses) > seen + 50, "load after the swap")
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert versions == {"1", new_version}
    assert set(statuses) == {200}, f"{len(statuses) - statuses.count(200)} failed requests"


def test_tampered_artifact_is_refused_and_the_old_model_keeps_serving(server, http, world):
    serving = http.get(f"/v2/models/{NAME}/ready").json()["version"]
    rejected_before = _metric(http.get("/metrics").text, 'sluicegate_model_reloads_total{outcome="rejected"}')
    data = world["onnx"].read_bytes()
    bad_version, stored = _register_file(world, data, sha256_file(world["onnx"]))
    stored.write_bytes(data + b"\x00")  # tampered after registration
    world["client"].set_registered_model_alias(NAME, registry.CHAMPION, bad_version)
    _wait_for(lambda: _metric(http.get("/metrics").text, 'sluicegate_model_reloads_total{outcome="rejected"}')
              > rejected_before, "the tampered version to be rejected")
    assert "does not match" in (server.app.default.manager.last_error or "")
    assert http.get(f"/v2/models/{NAME}/ready").json()["version"] == serving
    answer = http.post(f"/v2/models/{NAME}/infer", json=_infer_body(), headers=AUTH)
    assert answer.status_code == 200 and answer.json()["model_version"] == serving


def test_events_scored_elsewhere_are_counted_without_scoring(http, server, world):
    when = pd.Timestamp(world["frame"]["event_timestamp"].max()) + pd.Timedelta(minutes=30)
    customer = 10**9 + 7
    rows = [{**_business(world["frame"].iloc[-3]), "transaction_id": f"elsewhere-{i}", "customer_id": customer,
             "event_timestamp": (when + pd.Timedelta(seconds=i)).isoformat()} for i in range(3)]
    answer = http.post("/events", json=rows + rows[:1], headers=AUTH)  # the first resent: counted once
    assert answer.status_code == 200 and answer.json() == {"accepted": 4, "refused": []}, answer.text
    ids = [f"elsewhere-{i}" for i in range(3)]
    held = server.app.default.online_state().read({("customer", str(customer)): ids})[("customer", str(customer))]
    assert len(held.ts) == 3 and all(held.holds(i) for i in ids)
    bad = http.post("/events", json=[rows[0], {"transaction_id": "x"}], headers=AUTH)
    assert bad.status_code == 422 and bad.json()["error"].startswith("event 1: invalid request")
