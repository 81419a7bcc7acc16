"""prefect.yaml against the stack `make up` starts (scripts/up.sh: Prefect server, MLflow server,
`prefect deploy --all`, a process worker): deployments registered with their schedules and
parameter schemas, a bad parameter refused before any work, Prefect's own CLI (`deployment ls`,
`work-pool ls`, `deployment run`, `flow-run ls`) answering, a run started from the CLI completed by
the worker, and the monitor flow end to end: no traffic, then drift that starts training-pipeline
through the API exactly once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from sluicegate.config import HomePaths
from sluicegate.data.batches import write_batch
from sluicegate.data.synthetic import GenerateConfig, generate_transactions
from tests.conftest import REPO

pytestmark = [pytest.mark.timeout(1200)]

CRONS = {"scheduled-retrain": "0 2 * * *", "monitor": "15 * * * *"}
BIN = Path(sys.executable).parent
POOL = "sluicegate-process"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`make up` itself (scripts/up.sh) on free ports with its own SLUICEGATE_HOME; scripts/down.sh after."""
    home = tmp_path_factory.mktemp("stack")
    ports = {name: _free_port() for name in ("PREFECT", "MLFLOW", "SERVE")}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "SLUICEGATE_", "MLFLOW_"))}
    env |= {"SLUICEGATE_HOME": str(home), "SLUICEGATE_BIN": str(BIN),
            **{f"SLUICEGATE_{name}_PORT": str(port) for name, port in ports.items()}}
    api = f"http://127.0.0.1:{ports['PREFECT']}/api"
    try:
        up = subprocess.run(["bash", "scripts/up.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        # What a user's shell needs for Prefect's CLI against that server (up.sh prints the same URL).
        cli_env = {**env, "PREFECT_API_URL": api, "PREFECT_HOME": str(home / "prefect"), "COLUMNS": "250"}
        yield {"api": api, "home": home, "env": env, "cli_env": cli_env, "up": up.stdout,
               "mlflow": f"http://127.0.0.1:{ports['MLFLOW']}"}
    finally:
        subprocess.run(["bash", "scripts/down.sh"], cwd=REPO, env=env, capture_output=True, timeout=120)


def _prefect(stack, *args: str, timeout: float = 120) -> str:
    """Prefect's own CLI against the stack; a 4xx from the server (the fastapi 0.151+ 422) fails the test."""
    out = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=stack["cli_env"], capture_output=True,
                         text=True, timeout=timeout)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "Unprocessable Entity" not in text, f"prefect {' '.join(args)}:\n{text[-3000:]}"
    return text


def _deployments(api: str) -> dict[str, dict]:
    return {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}).json()}


def _declared() -> dict[str, dict]:
    return {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}


def test_prefect_yaml_declares_the_five_deployments_on_the_process_pool():
    declared = _declared()
    assert set(declared) == {"training-pipeline", "scheduled-retrain", "deploy", "rollback", "monitor"}
    assert declared["deploy"]["entrypoint"] == "flows/deploy.py:deploy_flow"
    assert declared["rollback"]["entrypoint"] == "flows/deploy.py:rollback_flow"
    assert {d["work_pool"]["name"] for d in declared.values()} == {POOL}
    for name, cron in CRONS.items():
        assert [s["cron"] for s in declared[name]["schedules"]] == [cron]


def test_make_up_registers_every_deployment_with_prefect_deploy(stack):
    up = (REPO / "scripts/up.sh").read_text()
    assert "deploy --all" in up and "work-pool create \"$POOL\" --type process" in up
    assert not (REPO / "src/sluicegate/flows/deployments.py").exists()  # no hand-written registration left
    assert "deploy --all" in stack["up"]
    assert "successfully created" in (stack["home"] / "run" / "deploy.log").read_text()


def test_deployments_are_registered_with_their_schedules(stack):
    found = _deployments(stack["api"])
    assert set(found) == set(_declared())
    for name, dep in found.items():
        assert dep["work_pool_name"] == POOL
        assert dep["enforce_parameter_schema"] is True
        assert dep["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
        crons = [s["schedule"]["cron"] for s in dep["schedules"] if s["active"]]
        assert crons == ([CRONS[name]] if name in CRONS else []), name
    # The form: one pydantic model, with bounds and dropdowns the UI renders.
    schema = found["training-pipeline"]["parameter_openapi_schema"]
    fields = schema["definitions"]["PipelineParams"]["properties"]
    assert fields["max_epochs"]["minimum"] == 1
    assert "enum" in fields["precision"] and "enum" in fields["device"]


def test_an_invalid_parameter_is_refused_before_any_run_exists(stack):
    api = stack["api"]
    dep = _deployments(api)["training-pipeline"]
    resp = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run",
                      json={"parameters": {"params": {"max_epochs": 0}}})
    assert resp.status_code == 409 and "max_epochs" in resp.text
    runs = httpx.post(f"{api}/flow_runs/filter",
                      json={"deployments": {"id": {"any_": [dep["id"]]}}}).json()
    assert runs == []


def test_prefects_cli_lists_deployments_and_pools(stack):
    listed = _prefect(stack, "deployment", "ls")
    for name in _declared():
        assert f"{name}/{name}" in listed, listed
    assert POOL in _prefect(stack, "work-pool", "ls")
    _prefect(stack, "flow-run", "ls")  # answers (on fastapi 0.151+ this one was a 422 too)


def test_a_run_started_with_prefects_cli_is_completed_by_make_ups_worker(stack):
    """`prefect deployment run` from a shell; the worker `make up` started runs it from this checkout,
    against `make up`'s MLflow server, and `prefect flow-run ls` shows it completed."""
    cfg = GenerateConfig(rows=12_000, days=6, seed=21)
    gen = subprocess.run([str(BIN / "sluicegate"), "generate", "--rows", str(cfg.rows), "--days", str(cfg.days),
                          "--seed", str(cfg.seed)], cwd=REPO, env=stack["env"], capture_output=True, text=True)
    assert gen.returncode == 0, gen.stdout + gen.stderr
    params = {"params": {"max_epochs": 1, "promote": False, "actor": "test_deployments"}}
    started = _prefect(stack, "deployment", "run", "training-pipeline/training-pipeline", "--params",
                       json.dumps(params), "--flow-run-name", "cli-run", "--watch", "--watch-timeout", "900",
                       timeout=960)
    assert "Completed" in started, started[-3000:]
    runs = _prefect(stack, "flow-run", "ls", "--state", "COMPLETED")
    assert "cli-run" in runs and "training-pipeline" in runs, runs
    # The run registered a challenger on make up's MLflow server.
    from mlflow import MlflowClient

    client = MlflowClient(stack["mlflow"], stack["mlflow"])
    version = client.get_model_version_by_alias("fraud-detector", "challenger")
    assert version.tags["batch_id"] == cfg.batch_id


def _replay(spec, drift: str, day: str) -> None:
    """A day of traffic through a real `sluicegate serve` (its own prediction log, nothing written by hand)."""
    from tests.replay import model_server, predict_rows

    batch = generate_transactions(GenerateConfig(rows=12_000, days=6, seed=21, start=day, drift=drift), spec)
    when = pd.to_datetime(batch[spec.timestamp], utc=True)
    with model_server(dict(os.environ)) as url:
        predict_rows(url, batch[when < pd.Timestamp(day, tz="UTC") + pd.Timedelta(days=1)])


def _triggered_runs(api: str) -> list[dict]:
    return httpx.post(f"{api}/flow_runs/filter",
                      json={"flow_runs": {"tags": {"all_": ["drift-retrain"]}}}).json()


def test_monitor_no_traffic_then_drift_starts_one_retrain(stack, spec, home):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from sluicegate.config import Settings
    from sluicegate.flows.monitor import MonitorParams, monitor
    from sluicegate.flows.pipeline import PipelineParams, training_pipeline
    from sluicegate.ship import registry

    api = stack["api"]
    _prefect(stack, "work-pool", "pause", POOL)  # a triggered run then waits, SCHEDULED, as without a worker
    cfg = GenerateConfig(rows=12_000, days=6, seed=21)
    write_batch(generate_transactions(cfg, spec), HomePaths(home, spec.name).raw, cfg.batch_id, spec.timestamp)
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
        assert champion is not None

        _replay(spec, drift="amount", day="2026-10-07")
        first = monitor(MonitorParams(window_days=4))
        assert first["status"] == "triggered", first
        assert "amount" in first["drifting"] and "amount PSI" in first["reason"]
        runs = _triggered_runs(api)
        assert len(runs) == 1 and runs[0]["id"] == first["flow_run_id"]
        assert runs[0]["parameters"]["params"]["batch"].startswith("window_")
        assert runs[0]["state_type"] == "SCHEDULED"  # the pool is paused: it waits for the worker

        # More drifted traffic an hour later: the signal holds, but the run is in flight.
        _replay(spec, drift="amount", day="2026-10-08")
        second = monitor(MonitorParams(window_days=4))
        assert second["status"] == "checked" and "in flight" in second["reason"], second
        # The run ends; the signal holds still; the cooldown keeps it at one retrain.
        httpx.delete(f"{api}/flow_runs/{first['flow_run_id']}").raise_for_status()
        _replay(spec, drift="amount", day="2026-10-09")
        third = monitor(MonitorParams(window_days=4))
        assert third["status"] == "checked" and "suppressed" in third["reason"], third
        assert len(_triggered_runs(api)) == 0
