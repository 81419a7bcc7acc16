"""The server's champion reload (`serve.model.ModelManager`) against a real MLflow store: a version
the checks refuse stays refused, a version whose artifact could not be fetched is tried again."""

from __future__ import annotations

import errno

import mlflow
import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from sluicegate.config import Settings
from sluicegate.serve.model import ModelManager
from sluicegate.ship import registry
from tests.unit.ship.test_registry import _tiny_onnx

WIDTHS = (3, 2)  # _tiny_onnx's tensor contract


@pytest.fixture
def store(home):
    return registry.configure(Settings())


def _champion(store, tmp_path, numeric: int = 3) -> str:
    """A registered version on the tensor contract, moved to @champion; its version number."""
    name = Settings().model_name
    path = _tiny_onnx(tmp_path / f"m{numeric}.onnx", numeric=numeric)
    with mlflow.start_run() as run:
        info = registry.log_onnx_model(path)
        version = registry.register_candidate(store, name, info, run.info.run_id, path,
                                              {"threshold": "0.5", "variant": "fp32"}, metrics={})
    store.set_registered_model_alias(name, registry.CHAMPION, version.version)
    return str(version.version)


def _manager(rejected: list) -> ModelManager:
    return ModelManager(Settings(), 1, ["CPUExecutionProvider"], lambda spec: WIDTHS,
                        on_rejected=lambda version, why: rejected.append((version, why)))


TRANSIENT = {
    "mlflow_503": lambda: MlflowException("API request to http://mlflow:5000/api/2.0/mlflow-artifacts failed: "
                                          "503 Service Unavailable", error_code=TEMPORARILY_UNAVAILABLE),
    "connection_refused": lambda: requests.exceptions.ConnectionError("connection refused by mlflow:5000"),
    "disk_full": lambda: OSError(errno.ENOSPC, "No space left on device"),
}


def _fail_downloads(monkeypatch, times: int, exc_factory) -> list:
    """The first `times` artifact downloads raise; every call is counted."""
    real, calls = mlflow.artifacts.download_artifacts, []

    def flaky(*args, **kwargs):
        calls.append(kwargs.get("artifact_uri"))
        if len(calls) <= times:
            raise exc_factory()
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", flaky)
    return calls


@pytest.mark.parametrize("fault", list(TRANSIENT))
def test_a_transient_fetch_error_is_retried_at_the_next_poll(store, tmp_path, monkeypatch, fault):
    version = _champion(store, tmp_path)
    calls = _fail_downloads(monkeypatch, 1, TRANSIENT[fault])
    rejected = []
    manager = _manager(rejected)

    assert manager.refresh() is False  # not fetched: nothing serves yet, nothing is refused
    assert manager.current is None and not manager._rejected and rejected == []
    assert "cannot fetch the artifact" in manager.fetch_error and manager.last_error == manager.fetch_error

    assert manager.refresh() is True  # the next poll fetches it again and loads it
    assert manager.current.version == version and len(calls) == 2
    assert manager.fetch_error is None and manager.last_error is None and rejected == []


def test_the_serving_model_stays_while_the_new_champions_fetch_fails(store, tmp_path, monkeypatch):
    first = _champion(store, tmp_path)
    manager = _manager([])
    assert manager.refresh() and manager.current.version == first
    second = _champion(store, tmp_path, numeric=3)  # same graph, a new version
    calls = _fail_downloads(monkeypatch, 2, TRANSIENT["mlflow_503"])
    assert manager.refresh() is False and manager.refresh() is False  # two polls during the outage
    assert manager.current.version == first and f"v{second}" in manager.fetch_error
    assert manager.refresh() is True and manager.current.version == second and len(calls) == 3


def test_a_bad_model_stays_rejected_and_is_not_fetched_again(store, tmp_path, monkeypatch):
    version = _champion(store, tmp_path)
    store.set_model_version_tag(Settings().model_name, version, "sha256", "0" * 64)  # a hash mismatch
    calls = _fail_downloads(monkeypatch, 0, None)
    rejected = []
    manager = _manager(rejected)
    assert manager.refresh() is False and manager.refresh() is False
    assert manager.current is None and len(calls) == 1  # refused once, never fetched again
    assert [v for v, _ in rejected] == [version] and "does not match" in manager.last_error
    assert manager.fetch_error is None


def test_a_model_failing_its_contract_stays_rejected(store, tmp_path, monkeypatch):
    _champion(store, tmp_path, numeric=5)  # 5 numeric inputs where the server expects 3
    calls = _fail_downloads(monkeypatch, 0, None)
    rejected = []
    manager = _manager(rejected)
    assert manager.refresh() is False and manager.refresh() is False
    assert len(calls) == 1 and len(rejected) == 1 and "[N, 3]" in manager.last_error


@pytest.mark.skipif("CUDAExecutionProvider" in __import__("onnxruntime").get_available_providers(),
                    reason="this onnxruntime has the CUDA execution provider")
def test_a_server_whose_target_provider_is_missing_does_not_start(home):
    from sluicegate.runtime import ProviderUnavailable

    with pytest.raises(ProviderUnavailable, match="CUDAExecutionProvider is not available"):
        ModelManager(Settings(target="cuda"), 1, [], lambda spec: WIDTHS)


def test_the_server_serves_on_the_targets_provider(store, tmp_path):
    version = _champion(store, tmp_path)
    manager = ModelManager(Settings(), 1, [], lambda spec: WIDTHS)
    assert manager.refresh() and manager.current.version == version
    assert manager.current.session.get_providers()[0] == manager.hardware.provider == "CPUExecutionProvider"


def _champion_on_spec(store, tmp_path, spec, evidence: dict) -> str:
    """A version trained on `spec` (its tag and, as the pipeline records it, its evidence), on a graph of
    that spec's widths, moved to @champion."""
    from sluicegate.features.inputs import tensor_widths
    from sluicegate.train.identity import spec_hash

    numeric, categorical = tensor_widths(spec)
    path = _tiny_onnx(tmp_path / f"spec-{spec_hash(spec)}.onnx", numeric=numeric, categorical=categorical)
    name = Settings().model_name
    with mlflow.start_run() as run:
        mlflow.log_dict(evidence, "evidence/evidence.json")
        info = registry.log_onnx_model(path)
        version = registry.register_candidate(store, name, info, run.info.run_id, path,
                                              {"threshold": "0.5", "variant": "fp32", "spec_hash": spec_hash(spec)},
                                              metrics={})
    store.set_registered_model_alias(name, registry.CHAMPION, version.version)
    return str(version.version)


def _fewer_categories():
    from sluicegate.spec import parse_spec

    raw = Settings().spec.model_dump(mode="json")
    raw["features"]["categorical"] = raw["features"]["categorical"][:-1]
    return parse_spec(raw)


def test_a_champion_trained_on_another_spec_is_served_on_its_own_spec_and_back(store, tmp_path):
    from sluicegate.features.inputs import tensor_widths

    own = Settings().spec
    first = _champion_on_spec(store, tmp_path, own, {"dataset": {"spec": own.model_dump(mode="json")}})
    manager = ModelManager(Settings(), 1, ["CPUExecutionProvider"], tensor_widths)
    assert manager.refresh() and manager.current.spec is own  # the server's own spec: nothing fetched
    other = _fewer_categories()
    second = _champion_on_spec(store, tmp_path, other, {"dataset": {"spec": other.model_dump(mode="json")}})
    assert manager.refresh() and manager.current.version == second
    assert manager.current.spec == other and tensor_widths(manager.current.spec) != tensor_widths(own)
    store.set_registered_model_alias(Settings().model_name, registry.CHAMPION, first)  # a rollback
    assert manager.refresh() and manager.current.version == first and manager.current.spec is own


def test_a_champion_on_another_spec_that_records_none_is_rejected(store, tmp_path):
    from sluicegate.features.inputs import tensor_widths

    rejected = []
    _champion_on_spec(store, tmp_path, _fewer_categories(), {"dataset": {}})
    manager = ModelManager(Settings(), 1, ["CPUExecutionProvider"], tensor_widths,
                           on_rejected=lambda version, why: rejected.append(why))
    assert manager.refresh() is False and manager.current is None
    assert rejected and "records no spec" in rejected[0]
