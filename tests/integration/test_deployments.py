"""prefect.yaml against a real Prefect server: deployments registered with their
schedules and parameter schemas, a bad parameter refused before any work, and the
monitor flow end to end: no traffic, then drift that starts training-pipeline
through the API exactly once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from sluicegate.data.batches import write_batch
from sluicegate.data.synthetic import GenerateConfig, generate_transactions
from tests.conftest import REPO

pytestmark = [pytest.mark.timeout(900)]

CRONS = {"scheduled-retrain": "0 2 * * *", "monitor": "15 * * * *"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Prefect server on a free port, with its own SQLite database."""
    root = tmp_path_factory.mktemp("prefect")
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(root), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root}/prefect.db",
           "PREFECT_UI_API_URL": api}
    env.pop("PREFECT_API_URL", None)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        for _ in range(180):
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
            time.sleep(1)
        yield {"api": api, "home": root}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def registered(server) -> str:
    env = {**os.environ, "PREFECT_API_URL": server["api"], "PREFECT_HOME": str(server["home"])}
    out = subprocess.run([sys.executable, "-m", "sluicegate.flows.deployments", "register"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _deployments(api: str) -> dict[str, dict]:
    return {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}).json()}


def test_prefect_yaml_declares_the_five_deployments_on_the_process_pool():
    declared = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    assert set(declared) == {"training-pipeline", "scheduled-retrain", "deploy", "rollback", "monitor"}
    assert declared["deploy"]["entrypoint"] == "flows/deploy.py:deploy_flow"
    assert declared["rollback"]["entrypoint"] == "flows/deploy.py:rollback_flow"
    assert {d["work_pool"]["name"] for d in declared.values()} == {"sluicegate-process"}
    for name, cron in CRONS.items():
        assert [s["cron"] for s in declared[name]["schedules"]] == [cron]


def test_deployments_are_registered_with_their_schedules(server, registered):
    from sluicegate.flows.deployments import declared, entrypoint_exists

    found = _deployments(server["api"])
    expected = {d["name"] for d in declared() if entrypoint_exists(d["entrypoint"])}
    assert {"training-pipeline", "scheduled-retrain", "monitor"} <= expected
    assert set(found) == expected, registered
    for name, dep in found.items():
        assert dep["work_pool_name"] == "sluicegate-process"
        assert dep["enforce_parameter_schema"] is True
        crons = [s["schedule"]["cron"] for s in dep["schedules"] if s["active"]]
        assert crons == ([CRONS[name]] if name in CRONS else []), name
    # The form: one pydantic model, with bounds and dropdowns the UI renders.
    schema = found["training-pipeline"]["parameter_openapi_schema"]
    fields = schema["definitions"]["PipelineParams"]["properties"]
    assert fields["max_epochs"]["minimum"] == 1
    assert "enum" in fields["precision"] and "enum" in fields["device"]


def test_an_invalid_parameter_is_refused_before_any_run_exists(server, registered):
    api = server["api"]
    dep = _deployments(api)["training-pipeline"]
    resp = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run",
                      json={"parameters": {"params": {"max_epochs": 0}}})
    assert resp.status_code == 409 and "max_epochs" in resp.text
    runs = httpx.post(f"{api}/flow_runs/filter",
                      json={"deployments": {"id": {"any_": [dep["id"]]}}}).json()
    assert runs == []


def _prediction_log(spec, home: Path, champion_onnx: Path, version: str, drift: str, seed: int, name: str) -> None:
    """What the model server logs: raw columns without the label, features, score, version, latency, time."""
    from sluicegate.features import store as features
    from sluicegate.operate import monitor as mon
    from sluicegate.operate.stages import score

    batch = generate_transactions(GenerateConfig(rows=3_000, days=2, seed=seed, start="2026-10-20", drift=drift),
                                  spec)
    cust, merch = features.compute_feature_tables(batch, spec)
    frame = mon.reference_frame(batch, cust, merch, spec, None)
    frame["score"] = score(champion_onnx, frame, spec)
    frame["model_version"], frame["latency_ms"] = version, 1.5
    frame["logged_at"] = pd.Timestamp(datetime.now(UTC))
    folder = home / "predictions" / "v2"
    folder.mkdir(parents=True, exist_ok=True)
    frame.drop(columns=[spec.label]).to_parquet(folder / f"{name}.parquet", index=False)
    mon.write_labels(batch, spec, home / "labels", name)


def _triggered_runs(api: str) -> list[dict]:
    return httpx.post(f"{api}/flow_runs/filter",
                      json={"flow_runs": {"tags": {"all_": ["drift-retrain"]}}}).json()


def test_monitor_no_traffic_then_drift_starts_one_retrain(server, registered, spec, home):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from sluicegate.config import Settings
    from sluicegate.flows.monitor import MonitorParams, monitor
    from sluicegate.flows.pipeline import PipelineParams, training_pipeline
    from sluicegate.ship import registry

    api = server["api"]
    cfg = GenerateConfig(rows=12_000, days=6, seed=21)
    write_batch(generate_transactions(cfg, spec), home / "raw", cfg.batch_id, spec.timestamp)
    with temporary_settings({PREFECT_API_URL: api}):
        empty = monitor(MonitorParams())
        assert empty["status"] == "no_traffic" and "no traffic" in empty["reason"]

        result = training_pipeline(PipelineParams(batch=cfg.batch_id, max_epochs=3))
        settings = Settings()
        client = registry.configure(settings)
        if registry.version_by_alias(client, settings.model_name, registry.CHAMPION) is None:
            # The gates may block a model trained on so little data; the monitor only needs a champion.
            client.set_registered_model_alias(settings.model_name, registry.CHAMPION, result["version"])
        champion = registry.version_by_alias(client, settings.model_name, registry.CHAMPION)
        onnx = registry.download_onnx(client, champion, home / "champion")

        _prediction_log(spec, home, onnx, champion.version, drift="amount", seed=5, name="hour-1")
        first = monitor(MonitorParams(window_days=4))
        assert first["status"] == "triggered", first
        assert "amount" in first["drifting"] and "amount PSI" in first["reason"]
        runs = _triggered_runs(api)
        assert len(runs) == 1 and runs[0]["id"] == first["flow_run_id"]
        assert runs[0]["parameters"]["params"]["batch"].startswith("window_")
        assert runs[0]["state_type"] == "SCHEDULED"  # no worker here: it waits for one

        # More drifted traffic an hour later: the signal holds, but the run is in flight.
        _prediction_log(spec, home, onnx, champion.version, drift="amount", seed=6, name="hour-2")
        second = monitor(MonitorParams(window_days=4))
        assert second["status"] == "checked" and "in flight" in second["reason"], second
        # The run ends; the signal holds still; the cooldown keeps it at one retrain.
        httpx.delete(f"{api}/flow_runs/{first['flow_run_id']}").raise_for_status()
        _prediction_log(spec, home, onnx, champion.version, drift="amount", seed=7, name="hour-3")
        third = monitor(MonitorParams(window_days=4))
        assert third["status"] == "checked" and "suppressed" in third["reason"], third
        assert len(_triggered_runs(api)) == 0
