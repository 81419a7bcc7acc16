"""Faults the pipeline and the server survive, each with real parts and one injected fault.

- poisoned batches: blocked by the validation stage, kept whole in quarantine, never picked again;
- MLflow down mid-run (a real `mlflow server`, SIGKILLed): the register task retries, the run fails
  saying which server it could not reach, nothing is registered; once MLflow is back a re-run resumes
  from the finished checkpoint and promotes;
- a candidate that passes every gate but fails the server's warm-up is not promoted;
- the disk under the prediction log is full: serving goes on, /metrics and /v2/health say so, and the
  records are written once the disk is back;
- the champion alias moved to a model whose warm-up fails: the server keeps serving the old one;
- MLflow down while serving: the loaded model keeps answering, the health routes say the registry
  is unreachable until a poll succeeds again.

Faults covered elsewhere: the online store down (503, recovery) and a tampered artifact in
tests/integration/test_serving.py; a killed training process in tests/integration/test_resume.py.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import onnx
import pandas as pd
import pytest
import yaml
from onnx import TensorProto, helper

from sluicegate.config import Settings, ensure_home
from sluicegate.data import stages as data_stages
from sluicegate.data.batches import read_batch, write_batch
from sluicegate.data.synthetic import GenerateConfig, generate_transactions, inject_fault
from sluicegate.features.inputs import cardinalities, numeric_inputs
from sluicegate.runtime import sha256_file
from sluicegate.ship import registry
from sluicegate.spec import load_spec
from tests.integration import test_serving as served
from tests.replay import wait_until_ok

REPO = Path(__file__).resolve().parents[2]
NAME = "fraud-detector"
ROWS, DAYS, EPOCHS = 16_000, 6, 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ poisoned batches

def _flood_duplicates(df, spec):
    return pd.concat([df, df, df]).sort_values(spec.timestamp, kind="stable")


def _flood_out_of_range(df, spec):
    df = df.copy()
    df.loc[df.index[::2], "amount"] = 5e7  # half the batch far above the spec's maximum
    return df


POISON = {
    "label_flip_5pct": lambda df, spec: inject_fault(df, "label_flip", spec, 3),
    "duplicates_5pct": lambda df, spec: inject_fault(df, "duplicates", spec, 3),
    "duplicate_flood": _flood_duplicates,
    "out_of_range": lambda df, spec: inject_fault(df, "out_of_range", spec, 3),
    "out_of_range_flood": _flood_out_of_range,
    "schema_renamed_column": lambda df, spec: inject_fault(df, "rename_column", spec, 3),
    "schema_dropped_column": lambda df, spec: inject_fault(df, "drop_column", spec, 3),
    "schema_added_column": lambda df, spec: df.assign(ip_address="10.0.0.1"),
    "schema_changed_type": lambda df, spec: inject_fault(df, "bad_dtype", spec, 3),
}


@pytest.fixture(scope="module")
def clean_batch():
    spec = load_spec()
    return spec, generate_transactions(GenerateConfig(rows=5000, days=3, seed=4), spec)


@pytest.fixture(scope="module")
def gx_context(tmp_path_factory):
    import shutil
    target = tmp_path_factory.mktemp("gx") / "expectations"
    shutil.copytree(REPO / "expectations", target, ignore=shutil.ignore_patterns("uncommitted"))
    return target


@pytest.mark.parametrize("poison", list(POISON))
def test_poisoned_batch_is_blocked_before_training(home, clean_batch, gx_context, poison):
    spec, clean = clean_batch
    settings = Settings()
    ensure_home(settings.paths)
    poisoned = POISON[poison](clean, spec).reset_index(drop=True)
    batch_dir = write_batch(poisoned, settings.paths.raw, f"2026-10-01_{poison}", spec.timestamp)

    outcome = data_stages.validate_stage(settings, spec, batch_dir, gx_context)

    assert not outcome.passed and outcome.rows is None, poison
    assert outcome.report.failures, poison
    quarantined = outcome.quarantined_to
    assert len(read_batch(quarantined)) == len(poisoned)  # kept whole, for a person to look at
    assert (quarantined / "validation_report.json").exists() and (quarantined / "validation_report.md").exists()
    with pytest.raises(data_stages.NoBatchError):  # the next run cannot pick it up by default
        data_stages.find_batch(settings, None)


# ------------------------------------------------------------------ a real MLflow server

class MlflowServer:
    """`mlflow server` on loopback (SQLite unless given a store, local artifacts) in its own process
    group, so a kill takes its workers too."""

    def __init__(self, root: Path, backend_store_uri: str | None = None):
        self.root, self.port = root, _free_port()
        self.backend = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.root / "mlflow-server.log", "ab")
        cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1", "--artifacts-destination", str(self.root / "artifacts")]
        # The store URI may hold a password: the environment, not the command line (ps shows that).
        # The job runner starts a pool of worker processes these tests do not need.
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": self.backend, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        wait_until_ok(f"{self.url}/health", "mlflow server", seconds=180, process=self.proc,
                      log=self.root / "mlflow-server.log")

    def kill(self) -> None:
        """SIGKILL, like a crashed host: no clean shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Prefect's test server, a real MLflow server and one raw batch; a lenient policy (the model is
    tiny and the machine shared: these tests are about faults, not model quality)."""
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("faults")
    policy = yaml.safe_load((REPO / "gates.yaml").read_text())
    policy.update(min_pr_auc=0.0, max_ece=1.0, max_robustness_drop=1.0, max_behaviour_violation_rate=1.0,
                  latency_slo_p99_ms=1000.0, min_lift_over_baseline=None)  # about faults, not model quality
    (root / "gates.yaml").write_text(yaml.safe_dump(policy))
    server = MlflowServer(root)
    server.start()
    env = {"SLUICEGATE_HOME": str(root / "home"), "SLUICEGATE_GATES_PATH": str(root / "gates.yaml"),
           "SLUICEGATE_MLFLOW_TRACKING_URI": server.url, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
           # Fail fast on a refused connection: the retries under test are Prefect's, not urllib3's.
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        spec = load_spec()
        cfg = GenerateConfig(rows=ROWS, days=DAYS, seed=41)
        write_batch(generate_transactions(cfg, spec), Settings().paths.raw, cfg.batch_id, spec.timestamp)
        with prefect_test_harness(server_startup_timeout=120):
            yield {"server": server, "batch": cfg.batch_id, "spec": spec, "root": root}
    finally:
        server.kill()
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _client():
    return mlflow.MlflowClient(Settings().tracking_uri)


def _task_runs(flow_run_id) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                     sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=100)
    return {run.name.rsplit("-", 1)[0]: run for run in runs}


@pytest.fixture(scope="module")
def outage(world):
    """Run the pipeline; MLflow is SIGKILLed right after evaluation, before registration, and stays down."""
    import sluicegate.flows.pipeline as flow_module
    from sluicegate.flows.pipeline import PipelineParams, training_pipeline

    original = flow_module._log_parent_summary

    def then_mlflow_dies(parent, evaluated):
        original(parent, evaluated)
        world["server"].kill()

    flow_module._log_parent_summary = then_mlflow_dies
    try:
        return training_pipeline(PipelineParams(batch=world["batch"], max_epochs=EPOCHS), return_state=True)
    finally:
        flow_module._log_parent_summary = original


def test_mlflow_down_mid_run_retries_then_fails_clearly(world, outage):
    assert outage.is_failed()
    error = outage.result(raise_on_failure=False)
    assert f"127.0.0.1:{world['server'].port}" in str(error)  # says which server it could not reach
    tasks = _task_runs(outage.state_details.flow_run_id)
    register = tasks["register"]
    assert register.state.is_failed() and register.run_count == 4  # the first try and 3 retries
    assert tasks["evaluate"].state.is_completed()
    # Nothing lost, nothing half-done: the batch is still there to re-run and no version was registered.
    settings = Settings()
    assert (settings.paths.raw / world["batch"]).is_dir()
    world["server"].start()
    assert _client().search_model_versions(f"name='{NAME}'") == []


def test_rerun_after_mlflow_is_back_resumes_and_promotes(world, outage):
    from sluicegate.flows.pipeline import PipelineParams, training_pipeline

    assert world["server"].proc is not None  # restarted by the test before
    result = training_pipeline(PipelineParams(batch=world["batch"], max_epochs=EPOCHS))
    assert result["status"] == "promoted", result["reason"]
    client = _client()
    assert [str(v.version) for v in client.search_model_versions(f"name='{NAME}'")] == ["1"]
    # The re-run trained nothing again: it resumed from the checkpoint the failed run had finished.
    train_runs = client.search_runs([client.get_experiment_by_name("sluicegate").experiment_id],
                                    f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}' "
                                    "and tags.mlflow.runName = 'train'")
    assert train_runs and int(train_runs[0].data.tags["resumed_from_epoch"]) > 0
    world["champion"] = str(result["version"])


# ------------------------------------------------------------------ warm-up failures

def test_gate_passing_model_whose_warm_up_fails_is_not_promoted(world, monkeypatch):
    """A second version of the champion's own artifact and evidence: every gate passes, yet the server's
    warm-up run fails on it (injected: the runtime raises), so it must not become champion."""
    from sluicegate.policy import load_policy
    from sluicegate.ship import loader as serving_model
    from sluicegate.ship.promote import deploy_newest

    settings = Settings()
    client = _client()
    champion = client.get_model_version(NAME, world["champion"])
    twin = client.create_model_version(NAME, source=champion.source, run_id=champion.run_id,
                                       tags=champion.tags, model_id=champion.source.removeprefix("models:/"))
    client.set_registered_model_alias(NAME, registry.CHALLENGER, twin.version)
    policy, spec = load_policy(settings.gates_path), world["spec"]

    def failing_run(self, numeric, categorical):  # injected fault: the runtime fails on this hardware
        raise RuntimeError("injected: onnxruntime kernel failure")

    monkeypatch.setattr(serving_model.LoadedModel, "run", failing_run)
    blocked = deploy_newest(settings, policy, spec, actor="test")
    monkeypatch.undo()

    assert blocked.status == "blocked", blocked.reason
    assert "server_load" in blocked.reason and "warm-up run failed" in blocked.reason
    assert all(r.passed for r in blocked.decision.results if r.gate != "server_load")  # every real gate passed
    assert str(registry.version_by_alias(client, NAME, registry.CHAMPION).version) == world["champion"]
    assert client.get_model_version(NAME, twin.version).tags["gate_decision"] == "block"

    promoted = deploy_newest(settings, policy, spec, actor="test")  # the same version, runtime healthy
    assert promoted.status == "promoted", promoted.reason
    world["champion"] = str(twin.version)


# ------------------------------------------------------------------ the server

def test_disk_full_prediction_log_keeps_serving_and_surfaces_the_error(world, monkeypatch):
    from sluicegate.serve import predlog

    running = served.Running(Settings(), log_flush_s=0.2)
    tag = f"diskfull-{time.time_ns()}"
    try:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            assert http.get("/v2/health/live").json() == {"live": True}

            def disk_full(*args, **kwargs):  # injected fault: the volume under SLUICEGATE_HOME is full
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(predlog.pq, "write_table", disk_full)
            for i in range(30):
                body = {**served._infer_body(seed=i), "id": f"{tag}-{i}"}
                answer = http.post(f"/v2/models/{NAME}/infer", json=body, headers=served.AUTH)
                assert answer.status_code == 200, answer.text
            served._wait_for(lambda: served._metric(http.get("/metrics").text,
                                                    "sluicegate_prediction_log_write_errors_total") > 0,
                             "the failed write to show in /metrics")
            assert served._metric(http.get("/metrics").text, "sluicegate_prediction_log_failing") == 1.0
            for path in ("/v2/health/live", "/v2/health/ready"):
                answer = http.get(path)
                assert answer.status_code == 200
                assert "No space left on device" in " ".join(answer.json()["degraded"])
            assert http.post(f"/v2/models/{NAME}/infer", json=served._infer_body(),
                             headers=served.AUTH).status_code == 200

            monkeypatch.undo()  # the disk has room again
            served._wait_for(lambda: "degraded" not in http.get("/v2/health/live").json(),
                             "the log to be written again")
            assert served._metric(http.get("/metrics").text, "sluicegate_prediction_log_failing") == 0.0
    finally:
        monkeypatch.undo()
        running.stop()
    logged = pd.read_parquet(Settings().paths.predictions / "v2")
    mine = logged[logged["request_id"].str.startswith(tag, na=False)]
    assert mine["request_id"].nunique() == 30  # every record kept through the outage, none lost
    assert not list((Settings().paths.predictions / "v2").rglob(".*.tmp"))


def _out_of_range_onnx(path: Path, categorical_width: int) -> Path:
    """Meets the tensor contract but answers 5 + sum(numeric): not a probability."""
    numeric = helper.make_tensor_value_info("numeric", TensorProto.FLOAT, ["N", len(numeric_inputs(load_spec()))])
    categorical = helper.make_tensor_value_info("categorical", TensorProto.INT64, ["N", categorical_width])
    out = helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N"])
    nodes = [helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])),
             helper.make_node("Constant", [], ["five"], value=helper.make_tensor("f", TensorProto.FLOAT, [], [5.0])),
             helper.make_node("ReduceSum", ["numeric", "axes"], ["total"], keepdims=0),
             helper.make_node("Add", ["total", "five"], ["probability"])]
    graph = helper.make_graph(nodes, "out_of_range", [numeric, categorical], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def test_server_keeps_serving_when_the_new_champions_warm_up_fails(world, tmp_path):
    settings = Settings()
    client = _client()
    running = served.Running(settings)
    try:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            assert http.get(f"/v2/models/{NAME}/ready").json()["version"] == world["champion"]
            bad = _out_of_range_onnx(tmp_path / "model.onnx", len(cardinalities(world["spec"])))
            with mlflow.start_run() as run:
                mlflow.log_artifact(str(bad), artifact_path="model")
            version = client.create_model_version(NAME, source=f"runs:/{run.info.run_id}/model",
                                                  run_id=run.info.run_id,
                                                  tags={"sha256": sha256_file(bad), "threshold": "0.5",
                                                        "variant": "fp32"})
            client.set_registered_model_alias(NAME, registry.CHAMPION, version.version)
            served._wait_for(lambda: served._metric(http.get("/metrics").text,
                                                    'sluicegate_model_reloads_total{outcome="rejected"}') > 0,
                             "the new champion to be rejected")
            assert "warm-up gave" in (running.app.default.manager.last_error or "")
            answer = http.post(f"/v2/models/{NAME}/infer", json=served._infer_body(), headers=served.AUTH)
            assert answer.status_code == 200 and answer.json()["model_version"] == world["champion"]
            assert np.all(np.array(answer.json()["outputs"][0]["data"]) <= 1.0)
    finally:
        client.set_registered_model_alias(NAME, registry.CHAMPION, world["champion"])
        running.stop()


def test_server_keeps_serving_while_mlflow_is_down(world):
    running = served.Running(Settings())
    try:
        with httpx.Client(base_url=running.url, timeout=30) as http:
            assert http.get("/v2/health/ready").json()["version"] == world["champion"]
            world["server"].kill()  # the registry's host crashes
            served._wait_for(lambda: "degraded" in http.get("/v2/health/ready").json(), "a failed registry poll")
            ready = http.get("/v2/health/ready")
            assert ready.status_code == 200 and ready.json()["version"] == world["champion"]
            assert "registry unreachable" in " ".join(ready.json()["degraded"])
            for i in range(20):
                answer = http.post(f"/v2/models/{NAME}/infer", json=served._infer_body(seed=i), headers=served.AUTH)
                assert answer.status_code == 200 and answer.json()["model_version"] == world["champion"]

            world["server"].start()  # back on the same address
            served._wait_for(lambda: "degraded" not in http.get("/v2/health/ready").json(),
                             "a successful poll to clear the warning")
    finally:
        if world["server"].proc is None:
            world["server"].start()
        running.stop()
