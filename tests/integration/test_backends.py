"""The pipeline on real backends: a Prefect server on PostgreSQL, an MLflow server on PostgreSQL and
the online state on Redis, all on loopback; then a stream of events through /predict on Redis, and a
Redis outage.

Needs the servers `scripts/backends.sh start` runs; skipped (saying so) without them:

    eval "$(bash scripts/backends.sh start)" && pytest tests/integration/test_backends.py
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml

from sluicegate.config import Settings
from sluicegate.data.batches import write_batch
from sluicegate.data.synthetic import GenerateConfig, generate_transactions
from sluicegate.features import online
from sluicegate.features import stages as features_stages
from sluicegate.ship import registry
from sluicegate.spec import load_spec
from tests.integration import test_serving as served
from tests.integration.test_faults import MlflowServer, _free_port
from tests.integration.test_security import capture_logs, find_secrets

REPO = Path(__file__).resolve().parents[2]
NEEDED = ("SLUICEGATE_TEST_PREFECT_DB_URL", "SLUICEGATE_TEST_MLFLOW_DB_URL", "SLUICEGATE_TEST_FEAST_REDIS")
pytestmark = pytest.mark.skipif(
    not all(os.environ.get(k) for k in NEEDED),
    reason="PostgreSQL and Redis are not running: `eval \"$(bash scripts/backends.sh start)\"` starts them "
           f"and sets {', '.join(NEEDED)}")


def _wait_http(url: str, proc: subprocess.Popen, log: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url} did not answer; see {log}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _passwords() -> list[str]:
    pg = os.environ["SLUICEGATE_TEST_MLFLOW_DB_URL"].split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    redis = os.environ["SLUICEGATE_TEST_FEAST_REDIS"].split("password=", 1)[1].split(",", 1)[0]
    return [pg, redis]


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    """A Prefect server and an MLflow server on PostgreSQL; names unique to this session, since the
    databases outlive it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = tmp_path_factory.mktemp("backends")
    prefect_port = _free_port()
    log = root / "prefect-server.log"
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false",
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": os.environ["SLUICEGATE_TEST_PREFECT_DB_URL"]}
    prefect = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                                "127.0.0.1", "--port", str(prefect_port), "--no-services"],
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    mlflow_server = MlflowServer(root, os.environ["SLUICEGATE_TEST_MLFLOW_DB_URL"])
    policy = yaml.safe_load((REPO / "gates.yaml").read_text())
    policy.update(min_pr_auc=0.0, max_ece=1.0, max_robustness_drop=1.0, max_behaviour_violation_rate=1.0,
                  latency_slo_p99_ms=1000.0, min_lift_over_baseline=None)  # about the backends, not model quality
    (root / "gates.yaml").write_text(yaml.safe_dump(policy))
    session = uuid.uuid4().hex[:8]
    env = {"SLUICEGATE_HOME": str(root / "home"), "SLUICEGATE_GATES_PATH": str(root / "gates.yaml"),
           "SLUICEGATE_MODEL_NAME": f"fraud-detector-{session}", "SLUICEGATE_EXPERIMENT": f"backends-{session}",
           "SLUICEGATE_FEAST_REDIS": os.environ["SLUICEGATE_TEST_FEAST_REDIS"],
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    old = {k: os.environ.get(k) for k in env}
    try:
        mlflow_server.start()
        env["SLUICEGATE_MLFLOW_TRACKING_URI"] = mlflow_server.url
        old["SLUICEGATE_MLFLOW_TRACKING_URI"] = os.environ.get("SLUICEGATE_MLFLOW_TRACKING_URI")
        os.environ.update(env)
        _wait_http(f"http://127.0.0.1:{prefect_port}/api/health", prefect, log)
        with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{prefect_port}/api"}):
            yield {"root": root, "settings": Settings(), "mlflow": mlflow_server}
    finally:
        _stop(prefect)
        mlflow_server.kill()
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def run(backends):
    from sluicegate.flows.pipeline import PipelineParams, training_pipeline

    spec = load_spec()
    cfg = GenerateConfig(rows=12_000, days=6, seed=61)
    frame = generate_transactions(cfg, spec)
    write_batch(frame, backends["settings"].paths.raw, cfg.batch_id, spec.timestamp)
    with capture_logs() as log:
        state = training_pipeline(PipelineParams(batch=cfg.batch_id, max_epochs=2), return_state=True)
    return {"state": state, "result": state.result(), "frame": frame, "spec": spec, "log": log.getvalue()}


def _sql(url: str, query: str, *args) -> list[tuple]:
    import psycopg2

    dsn = url.replace("postgresql+asyncpg://", "postgresql://").replace("postgresql+psycopg2://", "postgresql://")
    with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
        cur.execute(query, args)
        return cur.fetchall()


def test_pipeline_promotes_with_prefect_and_mlflow_on_postgres_and_features_on_redis(backends, run):
    settings = backends["settings"]
    assert run["result"]["status"] == "promoted", run["result"]["reason"]
    # The flow run is a row in PostgreSQL, through the Prefect server.
    flow_run_id = str(run["state"].state_details.flow_run_id)
    rows = _sql(os.environ["SLUICEGATE_TEST_PREFECT_DB_URL"], "SELECT state_type FROM flow_run WHERE id = %s",
                flow_run_id)
    assert rows == [("COMPLETED",)]
    # The champion alias is a row in PostgreSQL, through the MLflow server.
    aliases = _sql(os.environ["SLUICEGATE_TEST_MLFLOW_DB_URL"],
                   "SELECT alias, version FROM registered_model_aliases WHERE name = %s", settings.model_name)
    assert ("champion", int(run["result"]["version"])) in aliases
    assert registry.status(registry.configure(settings), settings.model_name)["champion"]["version"] == \
        run["result"]["version"]
    # The online state is in Redis: the batch's events, one sorted set per entity key.
    state = online.open_state(settings, settings.spec)
    assert isinstance(state, online.RedisEventState) and state.stats()["events"] >= len(run["frame"])


def test_a_stream_through_redis_gets_the_offline_point_in_time_features(backends, run):
    """The next day's first events, in time order through /predict with the state on Redis, then landed as
    a batch: every aggregate served equals the offline value."""
    settings, spec = backends["settings"], backends["settings"].spec
    day = generate_transactions(GenerateConfig(rows=12_000, days=6, seed=61, start="2026-10-07"), spec).head(300)
    running = served.Running(settings, api_keys="")
    try:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            for _, row in day.iterrows():
                answer = http.post("/predict", json=served._business(row))
                assert answer.status_code == 200, answer.text
    finally:
        running.stop()
    logged = pd.read_parquet(settings.paths.predictions / "predict").drop_duplicates("request_id", keep="last")
    got = logged.set_index("request_id").loc[day[spec.id].to_numpy()]
    write_batch(day, settings.paths.raw, "next-day", spec.timestamp)
    expected = features_stages.feature_stage(settings, spec, day).frame.set_index(spec.id)
    for name in (a.feature_name for a in spec.features.aggregates):
        a, b = got[name].to_numpy(float), expected.loc[got.index, name].to_numpy(float)
        assert (np.isclose(a, b, rtol=1e-6) | (np.isnan(a) & np.isnan(b))).all(), name


def test_no_backend_password_in_mlflow_prefect_logs_or_files(backends, run, capfd, caplog):
    settings = backends["settings"]
    out, err = capfd.readouterr()
    found = find_secrets(_passwords(), settings.tracking_uri, settings.experiment, [settings.paths.root],
                         [run["log"], out, err, caplog.text])
    assert found == []


def test_predict_through_redis_survives_a_redis_outage(backends, run, tmp_path):
    """A Redis of this test's own (the shared one stays up), SIGKILLed while serving: /predict answers 503
    without leaking the connection string, then recovers with the same features once Redis is back."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is installed with the backends"
    port, password = _free_port(), uuid.uuid4().hex
    (tmp_path / "redis.conf").write_text(f"bind 127.0.0.1\nport {port}\nrequirepass {password}\ndir {tmp_path}\n"
                                         "appendonly yes\nappendfsync always\nsave \"\"\n")

    def start_redis() -> subprocess.Popen:
        proc = subprocess.Popen([binary, str(tmp_path / "redis.conf")], stdout=subprocess.DEVNULL,
                                stderr=subprocess.STDOUT, start_new_session=True)
        import redis
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if redis.Redis(port=port, password=password).ping():
                    return proc
            except redis.ConnectionError:
                time.sleep(0.1)
        pytest.fail("redis did not start")

    proc = start_redis()
    settings = backends["settings"].model_copy(update={"feast_redis": f"127.0.0.1:{port},password={password}"})
    features_stages.reconcile_online(settings, settings.spec, run["frame"], None)
    body = served._business(run["frame"].iloc[-1])
    running = served.Running(settings)
    try:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            first = http.post("/predict", json=body, headers=served.AUTH)
            assert first.status_code == 200, first.text
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            down = http.post("/predict", json=body, headers=served.AUTH)
            assert down.status_code == 503 and "online feature store unavailable" in down.json()["error"]
            assert password not in down.text
            assert http.post(f"/v2/models/{settings.model_name}/infer", json=served._infer_body(),
                             headers=served.AUTH).status_code == 200  # v2 does not need Feast
            proc = start_redis()  # same port, same append-only file
            back = http.post("/predict", json=body, headers=served.AUTH)
            assert back.status_code == 200, back.text
            # Same features: the state survived, and the retried event (same id) was not counted twice.
            assert back.json()["probability"] == first.json()["probability"]
    finally:
        running.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
