"""Security: API keys on every inference and admin route, no secret in logs or MLflow, models only
from the registry and only after their hash checks, names and paths that cannot traverse.

One real pipeline run (Prefect test server, MLflow on SQLite, Feast local) with secrets planted in the
environment the way a deployment has them; its MLflow runs, artifacts, Prefect logs, files under
SLUICEGATE_HOME and captured output are scanned for them. Its champion then serves the route tests.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml

from sluicegate.config import Settings, ensure_home
from sluicegate.data import stages as data_stages
from sluicegate.data.batches import write_batch
from sluicegate.data.synthetic import GenerateConfig, generate_transactions
from sluicegate.ship import registry
from sluicegate.spec import load_spec
from tests.integration import test_serving as served

REPO = Path(__file__).resolve().parents[2]
NAME = "fraud-detector"
SERVE_KEY = "sk-serve-5b1d9c0e7f3a4e21"
# Secrets a deployment keeps in its environment; none of them may end up in a log or an artifact.
PLANTED = {"SLUICEGATE_SERVE_API_KEYS": SERVE_KEY,
           "MLFLOW_TRACKING_PASSWORD": "mlflow-pw-8d2e61f0c4",
           "AWS_SECRET_ACCESS_KEY": "aws-secret-3f9a7c1e55b0d4",
           "PREFECT_API_KEY": "pnu_prefect-key-0a9b8c7d6e"}


# ------------------------------------------------------------------ the scanner (also used by test_backends)

def _prefect_logs() -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    texts = []
    with get_client(sync_client=True) as client:
        for page in range(100):  # bounded: 20,000 log lines at most
            logs = client.read_logs(limit=200, offset=page * 200)
            texts += [log.message for log in logs]
            if len(logs) < 200:
                break
        for run in client.read_flow_runs(sort=FlowRunSort.ID_DESC, limit=200):
            texts.append(repr(run.parameters))
    return texts


def find_secrets(secrets: list[str], tracking_uri: str, experiment: str, folders: list[Path],
                 extra_text: list[str]) -> list[str]:
    """Where each secret appears: MLflow params, tags and metric names of every run of the experiment,
    every artifact, registered-model and version tags, Prefect logs and flow-run parameters, every file
    under `folders`, and `extra_text` (captured output). Empty when nothing leaked."""
    client = mlflow.MlflowClient(tracking_uri)
    found = []

    def look(where: str, blob: bytes | str) -> None:
        data = blob.encode() if isinstance(blob, str) else blob
        found.extend(f"{where}: {s[:4]}..." for s in secrets if s.encode() in data)

    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
    assert runs, "nothing to scan: no MLflow run"
    for run in runs:
        look(f"run {run.info.run_id} params", repr(run.data.params))
        look(f"run {run.info.run_id} tags", repr(run.data.tags))
        look(f"run {run.info.run_id} metric names", repr(sorted(run.data.metrics)))
        if not client.list_artifacts(run.info.run_id):
            continue
        local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, tracking_uri=tracking_uri))
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            look(f"run {run.info.run_id} artifact {path.relative_to(local)}", path.read_bytes())
    for model in client.search_registered_models():
        look(f"registered model {model.name}", repr(model.tags))
        for version in client.search_model_versions(f"name='{model.name}'"):
            look(f"{model.name} v{version.version}", repr(version.tags) + str(version.source))
    for text in _prefect_logs():
        look("prefect log or flow-run parameters", text)
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            look(str(path), path.read_bytes())
    for text in extra_text:
        look("captured output", text)
    return found


@contextmanager
def capture_logs():
    """Every log record written meanwhile, whichever library wrote it, as text."""
    from prefect.logging.configuration import setup_logging

    setup_logging()  # Prefect's logging config replaces the root logger's handlers: let it happen first
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    # Prefect's own loggers that do not propagate to the root logger.
    loggers = [logging.getLogger(n) for n in ("", "prefect._internal", "prefect.extra")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield output
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


# ------------------------------------------------------------------ one pipeline run with secrets around

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from prefect.testing.utilities import prefect_test_harness

    root = tmp_path_factory.mktemp("security")
    policy = yaml.safe_load((REPO / "gates.yaml").read_text())
    policy.update(min_pr_auc=0.0, max_ece=1.0, max_robustness_drop=1.0, max_behaviour_violation_rate=1.0,
                  latency_slo_p99_ms=1000.0, min_lift_over_baseline=None)  # about secrets, not model quality
    (root / "gates.yaml").write_text(yaml.safe_dump(policy))
    env = {"SLUICEGATE_HOME": str(root / "home"), "SLUICEGATE_GATES_PATH": str(root / "gates.yaml"),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **PLANTED}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        spec = load_spec()
        cfg = GenerateConfig(rows=12_000, days=6, seed=51)
        write_batch(generate_transactions(cfg, spec), Settings().paths.raw, cfg.batch_id, spec.timestamp)
        with prefect_test_harness(server_startup_timeout=120):
            with capture_logs() as log:
                from sluicegate.flows.pipeline import PipelineParams, training_pipeline
                result = training_pipeline(PipelineParams(batch=cfg.batch_id, max_epochs=2))
            yield {"root": root, "result": result, "settings": Settings(), "spec": spec, "log": log.getvalue()}
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_no_secret_in_mlflow_prefect_logs_or_files(world, capfd, caplog):
    assert world["result"]["status"] == "promoted", world["result"]["reason"]
    settings = world["settings"]
    out, err = capfd.readouterr()
    # The scanner reaches every source: a value known to be in each (the batch id) is found there.
    batch = world["result"]["batch"]
    seen = " ".join(find_secrets([batch], settings.tracking_uri, settings.experiment, [settings.paths.root],
                                 [world["log"]]))
    for source in ("tags", "artifact", "prefect log", "raw", "captured output"):
        assert source in seen, source
    found = find_secrets(list(PLANTED.values()), settings.tracking_uri, settings.experiment, [settings.paths.root],
                         [world["log"], out, err, caplog.text])
    assert found == []


@pytest.fixture(scope="module")
def server(world):
    running = served.Running(world["settings"], api_keys=SERVE_KEY, metrics_auth=True, log_flush_s=0.2)
    yield running
    running.stop()


def _request(http: httpx.Client, method: str, path: str, headers: dict) -> httpx.Response:
    body = served._infer_body() if path.endswith("/infer") else {}
    return http.request(method, path, json=body if method == "POST" else None, headers=headers)


def test_every_inference_and_admin_route_needs_the_key(server, world, caplog):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        doc = http.get("/openapi.json").json()
        secured, open_routes = [], []
        for template, operations in doc["paths"].items():
            path = template.replace("{name}", NAME)
            for method, operation in operations.items():
                (secured if operation.get("security") else open_routes).append((method.upper(), path))
        # Inference, the versioned inference route (not in the document) and the admin surface (/metrics).
        assert set(secured) == {("POST", f"/v2/models/{NAME}/infer"), ("POST", "/predict"), ("GET", "/metrics")}
        secured.append(("POST", f"/v2/models/{NAME}/versions/1/infer"))
        wrong = "sk-serve-wrong-key-77aa"
        for method, path in secured:
            for headers in ({}, {"Authorization": f"Bearer {wrong}"}, {"X-API-Key": wrong},
                            {"Authorization": f"Basic {SERVE_KEY}"}):
                answer = _request(http, method, path, headers)
                assert answer.status_code == 401, (method, path, headers)
                assert SERVE_KEY not in answer.text and wrong not in answer.text
            for headers in ({"Authorization": f"Bearer {SERVE_KEY}"}, {"X-API-Key": SERVE_KEY}):
                assert _request(http, method, path, headers).status_code != 401, (method, path)
        # Probes and metadata stay open for load balancers and tritonclient's readiness calls.
        for method, path in open_routes:
            assert _request(http, method, path, {}).status_code == 200, (method, path)
    assert SERVE_KEY not in caplog.text and wrong not in caplog.text


def test_no_key_in_the_prediction_log(server, world):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for i in range(5):
            body = {**served._infer_body(seed=i), "id": f"sec-{i}"}
            assert http.post(f"/v2/models/{NAME}/infer", json=body,
                             headers={"Authorization": f"Bearer {SERVE_KEY}"}).status_code == 200
    served._wait_for(lambda: list((world["settings"].paths.predictions / "v2").rglob("*.parquet")),
                     "the prediction log to be written")
    for path in world["settings"].paths.predictions.rglob("*"):
        assert not path.is_file() or SERVE_KEY.encode() not in path.read_bytes(), path


# ------------------------------------------------------------------ models: only from the registry, only by hash

def _version(world, source: str, sha: str):
    client = mlflow.MlflowClient(world["settings"].tracking_uri)
    return client, client.create_model_version(NAME, source=source, tags={"sha256": sha, "threshold": "0.5",
                                                                         "variant": "fp32"})


def test_a_model_outside_the_registry_is_refused_even_with_the_right_hash(world, tmp_path):
    from sluicegate.runtime import sha256_file
    from sluicegate.ship.loader import ModelRejected, fetch_onnx
    from sluicegate.ship.promote import rollback

    client = mlflow.MlflowClient(world["settings"].tracking_uri)
    champion = registry.version_by_alias(client, NAME, registry.CHAMPION)
    onnx_path = registry.download_onnx(client, champion, tmp_path / "champion")
    outside = tmp_path / "outside"
    shutil.copytree(onnx_path.parent, outside)
    for source in (outside.as_uri(), str(outside), f"runs:/{champion.run_id}/../../../{outside.name}"):
        _, version = _version(world, source, sha256_file(onnx_path))
        with pytest.raises(ModelRejected, match="not in the registry"):
            fetch_onnx(client, version)
        with pytest.raises(RuntimeError, match="not in the registry"):
            rollback(world["settings"], str(version.version), actor="test", reason="test")
    assert str(registry.version_by_alias(client, NAME, registry.CHAMPION).version) == str(champion.version)


def test_a_swapped_artifact_is_refused_by_its_hash(world, tmp_path):
    """A version whose stored model.onnx was replaced by another valid model: fetch, rollback and
    deploy all refuse it."""
    from sluicegate.ship.loader import ModelRejected, fetch_onnx
    from sluicegate.ship.promote import rollback, server_load_check
    from tests.integration.test_faults import _out_of_range_onnx

    client = mlflow.MlflowClient(world["settings"].tracking_uri)
    champion = registry.version_by_alias(client, NAME, registry.CHAMPION)
    version = client.create_model_version(NAME, source=champion.source, run_id=champion.run_id,
                                          tags=champion.tags, model_id=champion.source.removeprefix("models:/"))
    # The registered artifact lives under SLUICEGATE_HOME/mlartifacts: swap the file in place.
    logged = client.get_logged_model(champion.source.removeprefix("models:/"))
    artifact = Path(logged.artifact_location.removeprefix("file://")) / "model.onnx"
    original = artifact.read_bytes()
    try:
        _out_of_range_onnx(artifact, 4)
        with pytest.raises(ModelRejected, match="does not match the registered"):
            fetch_onnx(client, version)
        with pytest.raises(RuntimeError, match="does not match the registered"):
            rollback(world["settings"], str(version.version), actor="test", reason="test")
        check = server_load_check(world["settings"], world["spec"], client, version)
        assert not check.passed and "does not match" in check.detail
    finally:
        artifact.write_bytes(original)
    assert str(registry.version_by_alias(client, NAME, registry.CHAMPION).version) == str(champion.version)


def test_no_route_accepts_a_model(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        auth = {"Authorization": f"Bearer {SERVE_KEY}"}
        for method, path in (("POST", f"/v2/repository/models/{NAME}/load"), ("POST", "/v2/repository/index"),
                             ("PUT", f"/v2/models/{NAME}"), ("POST", f"/v2/models/{NAME}/versions/9/load")):
            assert http.request(method, path, content=b"\x08\x07", headers=auth).status_code in (404, 405)


# ------------------------------------------------------------------ names and paths

@pytest.mark.parametrize("name", ["../etc", "a/b", "..", "a..b", "", ".hidden", "x" * 129, "a\\b", "café"])
def test_unsafe_model_names_are_refused(name, tmp_path, monkeypatch):
    from sluicegate.serve import create_app

    with pytest.raises(ValueError, match="not allowed"):
        registry.check_model_name(name)
    monkeypatch.setenv("SLUICEGATE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SLUICEGATE_MODEL_NAME", name)
    with pytest.raises(ValueError, match="not allowed"):
        create_app()
    with pytest.raises(ValueError, match="not allowed"):
        registry.configure(Settings())


def test_safe_model_names_are_accepted():
    for name in ("fraud-detector", "fraud_detector.v2", "M1"):
        assert registry.check_model_name(name) == name


def test_traversal_in_request_paths_reaches_nothing(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path in (f"/v2/models/{NAME}/versions/../../../etc/passwd", "/v2/models/..%2F..%2Fetc/ready",
                     f"/v2/models/{NAME}/versions/..%2F1/ready", "/v2/models/%2e%2e/infer", "/../../etc/passwd"):
            answer = http.get(path)
            assert answer.status_code in (400, 404), path
            assert "root:" not in answer.text


def test_a_batch_id_cannot_leave_the_raw_folder(home):
    settings = Settings()
    ensure_home(settings.paths)
    outside = settings.paths.quarantine / "not-a-raw-batch"
    outside.mkdir(parents=True)
    with pytest.raises(data_stages.NoBatchError):
        data_stages.find_batch(settings, "../quarantine/not-a-raw-batch")
