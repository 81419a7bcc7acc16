"""`ship.loader.fetch_onnx` tells a refused artifact (ModelRejected) from one it could not fetch
(FetchFailed), and the deploy's `server_load` gate does not turn a failed fetch into a block."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from sluicegate.config import Settings
from sluicegate.ship import registry
from sluicegate.ship.loader import FetchFailed, ModelRejected, fetch_onnx
from tests.unit.ship.test_registry import _tiny_onnx


@pytest.fixture
def store(home):
    return registry.configure(Settings())


@pytest.fixture
def version(store, tmp_path):
    path = _tiny_onnx(tmp_path / "m.onnx")
    with mlflow.start_run() as run:
        info = registry.log_onnx_model(path)
        return registry.register_candidate(store, Settings().model_name, info, run.info.run_id, path,
                                           {"threshold": "0.5", "variant": "fp32"}, metrics={})


def _unavailable(*args, **kwargs):
    raise MlflowException("API request to http://mlflow:5000 failed: 503 Service Unavailable",
                          error_code=TEMPORARILY_UNAVAILABLE)


def test_a_fetch_that_fails_is_fetch_failed_not_rejected(store, version, tmp_path, monkeypatch):
    assert fetch_onnx(store, version) == (tmp_path / "m.onnx").read_bytes()
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", _unavailable)
    with pytest.raises(FetchFailed, match=f"v{version.version}: cannot fetch the artifact: MlflowException: .*503"):
        fetch_onnx(store, version)


def test_an_artifact_without_model_onnx_or_with_another_hash_is_rejected(store, version, tmp_path, monkeypatch):
    store.set_model_version_tag(version.name, version.version, "sha256", "0" * 64)
    with pytest.raises(ModelRejected, match="does not match the registered"):
        fetch_onnx(store, store.get_model_version(version.name, version.version))
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda *a, **kw: str(empty))
    with pytest.raises(ModelRejected, match="has no model.onnx"):
        fetch_onnx(store, version)


def test_the_server_load_gate_raises_on_a_failed_fetch_instead_of_blocking(store, version, spec, monkeypatch):
    from sluicegate.ship.promote import server_load_check

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", _unavailable)
    with pytest.raises(FetchFailed):  # the gate task retries; no `block` is recorded against the model
        server_load_check(Settings(), spec, store, version)
