import socket

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from sluicegate.ship import registry


@pytest.fixture
def client(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowClient(uri, uri)


def test_no_model_or_no_alias_reads_as_no_version(client):
    assert registry.version_by_alias(client, "fraud-detector", registry.CHAMPION) is None  # not registered
    client.create_registered_model("fraud-detector")
    assert registry.version_by_alias(client, "fraud-detector", registry.CHAMPION) is None  # no alias yet


def test_an_unreachable_registry_raises_instead_of_reading_as_no_champion(monkeypatch):
    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException, match="127.0.0.1"):
        registry.version_by_alias(MlflowClient(url, url), "fraud-detector", registry.CHAMPION)


def test_a_set_alias_returns_its_version(client, tmp_path):
    client.create_registered_model("fraud-detector")
    version = client.create_model_version("fraud-detector", source=str(tmp_path))
    client.set_registered_model_alias("fraud-detector", registry.CHAMPION, version.version)
    assert registry.version_by_alias(client, "fraud-detector", registry.CHAMPION).version == version.version


# --- what MLflow's own pages show: signature, input example, logged-model metrics, dataset, decision ---

def _tiny_onnx(path, numeric: int = 3, categorical: int = 2):
    """A real ONNX model on the tensor contract: numeric [batch, N] float, categorical [batch, M] int64."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["categorical"], ["codes"], to=TensorProto.FLOAT),
         helper.make_node("Concat", ["numeric", "codes"], ["both"], axis=1),
         helper.make_node("ReduceSum", ["both", "axes"], ["total"], keepdims=0),
         helper.make_node("Sigmoid", ["total"], ["probability"])],
        "tiny",
        [helper.make_tensor_value_info("numeric", TensorProto.FLOAT, ["batch", numeric]),
         helper.make_tensor_value_info("categorical", TensorProto.INT64, ["batch", categorical])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture
def store(home):
    """The embedded MLflow store (SQLite under SLUICEGATE_HOME), configured the way the pipeline does."""
    from sluicegate.config import Settings

    return registry.configure(Settings())


def test_every_logged_model_has_a_signature_read_from_the_graph_and_an_input_example(store, tmp_path):
    import mlflow
    import numpy as np

    path = _tiny_onnx(tmp_path / "m.onnx", numeric=5, categorical=3)
    with mlflow.start_run():
        info = registry.log_onnx_model(path)
    signature = mlflow.models.get_model_info(info.model_uri).signature
    inputs = {s.name: (s.type, s.shape) for s in signature.inputs.inputs}
    assert inputs == {"numeric": (np.dtype(np.float32), (-1, 5)), "categorical": (np.dtype(np.int64), (-1, 3))}
    assert [(s.name, s.type, s.shape) for s in signature.outputs.inputs] == [
        ("probability", np.dtype(np.float32), (-1,))]
    # The input example is stored with the model and is a request the model answers.
    model = mlflow.pyfunc.load_model(info.model_uri)
    example = model.input_example
    assert example["numeric"].shape == (2, 5) and example["categorical"].dtype == np.int64
    assert model.predict(example)["probability"].shape == (2,)
    with pytest.raises(Exception, match="(?i)schema"):  # the signature is enforced: float64 is refused
        model.predict({"numeric": np.zeros((1, 5)), "categorical": np.zeros((1, 3), np.int64)})


def test_key_metrics_are_logged_against_the_logged_model(store, tmp_path):
    import mlflow

    path = _tiny_onnx(tmp_path / "m.onnx")
    with mlflow.start_run() as parent:  # the pipeline logs key metrics on its parent run ...
        mlflow.log_metrics({"pr_auc": 0.42, "server_p99_ms": 1.5, "not_a_key_metric": 7.0})
        with mlflow.start_run(nested=True) as stage:  # ... and registers in a nested stage run
            info = registry.log_onnx_model(path)
            version = registry.register_candidate(store, "fraud-detector", info, stage.info.run_id, path,
                                                  {"variant": "fp32"})
    logged = {m.key: m.value for m in store.get_logged_model(info.model_id).metrics}
    assert logged == {"pr_auc": 0.42, "server_p99_ms": 1.5}
    assert store.get_model_version("fraud-detector", version.version).source == f"models:/{info.model_id}"
    assert parent.info.run_id != stage.info.run_id
    # Explicit metrics win over the parent's.
    with mlflow.start_run() as run:
        info2 = registry.log_onnx_model(path)
        registry.register_candidate(store, "fraud-detector", info2, run.info.run_id, path, {}, metrics={"roc_auc": 0.9})
    assert {m.key: m.value for m in store.get_logged_model(info2.model_id).metrics} == {"roc_auc": 0.9}


def test_the_version_description_says_what_the_gate_decided(store, tmp_path):
    import mlflow

    path = _tiny_onnx(tmp_path / "m.onnx")
    with mlflow.start_run() as run:
        info = registry.log_onnx_model(path)
        version = registry.register_candidate(store, "fraud-detector", info, run.info.run_id, path, {})
    decision = {"promote": False, "variant": "int8", "reason": "blocked by latency_slo_p99_ms",
                "gates": [{"gate": "min_pr_auc", "threshold": 0.3, "measured": 0.41, "passed": True},
                          {"gate": "latency_slo_p99_ms", "threshold": 5.0, "measured": 7.25, "passed": False}]}
    registry.record_decision(store, "fraud-detector", version.version, decision)
    description = store.get_model_version("fraud-detector", version.version).description
    assert description.startswith("**Gate decision: blocked: stays @challenger** (variant `int8`)")
    assert "blocked by latency_slo_p99_ms" in description
    assert "| latency_slo_p99_ms | FAIL | 7.25 | 5 |" in description
    assert "| min_pr_auc | pass | 0.41 | 0.3 |" in description
    registry.record_decision(store, "fraud-detector", version.version, {**decision, "promote": True, "reason": "ok"})
    assert "promoted to @champion" in store.get_model_version("fraud-detector", version.version).description


def test_the_training_set_is_recorded_with_its_hash_as_digest(store, tmp_path):
    import hashlib

    import mlflow
    import pandas as pd

    frame = pd.DataFrame({"amount": [1.0, 2.5, 3.0], "is_fraud": [0, 1, 0]})
    data_hash = hashlib.sha256(b"the training set").hexdigest()
    path = _tiny_onnx(tmp_path / "m.onnx")
    with mlflow.start_run() as run:
        info = registry.log_onnx_model(path)
        registry.log_training_dataset(frame, data_hash, "training", targets="is_fraud", model_id=info.model_id)
    inputs = store.get_run(run.info.run_id).inputs
    (logged,) = inputs.dataset_inputs
    assert logged.dataset.digest == data_hash[:registry.DIGEST_CHARS]
    assert logged.dataset.name == f"train-{data_hash[:12]}"
    assert {t.key: t.value for t in logged.tags} == {"mlflow.data.context": "training", "data_hash": data_hash}
    assert '"num_rows": 3' in logged.dataset.profile and "amount" in logged.dataset.schema
    assert [m.model_id for m in inputs.model_inputs] == [info.model_id]


def test_the_logged_schema_is_the_one_mlflow_infers(store):
    import json

    import mlflow
    import numpy as np
    import pandas as pd
    from mlflow.types.utils import _infer_schema

    n = 500  # every kind of column, with and without missing values
    frame = pd.DataFrame({
        "amount": np.linspace(0, 1, n), "gap": np.where(np.arange(n) == n - 1, np.nan, 1.0),
        "count": np.arange(n), "is_fraud": np.arange(n) % 2, "flag": np.arange(n) % 3 == 0,
        "channel": pd.array(["pos", "web"] * (n // 2), dtype="string[pyarrow]"),
        "country": pd.array(["US"] * (n - 1) + [None], dtype="string[pyarrow]"),
        "device": pd.array(["ios"] * n, dtype="string[python]"),
        "at": pd.date_range("2026-10-01", periods=n, freq="min", tz="UTC"),
        "seen": pd.Series(pd.date_range("2026-10-01", periods=n, freq="min")).where(np.arange(n) > 0),
        "visits": pd.array([1] * (n - 1) + [None], dtype="Int64"),
    })
    assert registry.dataset_schema(frame) == _infer_schema(frame)
    with mlflow.start_run() as run:
        registry.log_training_dataset(frame, "0" * 64, "training", targets="is_fraud")
    (logged,) = store.get_run(run.info.run_id).inputs.dataset_inputs
    assert json.loads(logged.dataset.schema)["mlflow_colspec"] == _infer_schema(frame).to_dict()


# --- a registry that cannot answer is never read as "no champion", "no history" or "no version" ---

def _outage(code: str = "TEMPORARILY_UNAVAILABLE"):
    """What the MLflow client raises for a registry that answered 503 (or with another error code)."""
    from mlflow.protos import databricks_pb2

    def fail(*args, **kwargs):
        raise MlflowException("API request to http://mlflow:5000 failed: 503 Service Unavailable",
                              error_code=getattr(databricks_pb2, code))
    return fail


def _refused(*args, **kwargs):
    import requests

    raise requests.exceptions.ConnectionError("HTTPConnectionPool(host='mlflow', port=5000): connection refused")


def _registered_with_history(client, tmp_path):
    client.create_registered_model("fraud-detector")
    for _ in range(2):
        version = client.create_model_version("fraud-detector", source=str(tmp_path))
        before = registry.version_by_alias(client, "fraud-detector", registry.CHAMPION)
        registry.move_champion(client, "fraud-detector", version.version, before.version if before else None,
                               {"event": "promote", "actor": "test"}, tmp_path)


def test_a_model_that_is_not_registered_has_no_history_and_an_empty_status(client):
    assert registry.history(client, "fraud-detector") == []
    assert registry.previous_champion(client, "fraud-detector") is None
    assert registry.status(client, "fraud-detector") == {"model": "fraud-detector", "champion": None,
                                                         "challenger": None, "last_gate_decision": None}


@pytest.mark.parametrize("fault", [_outage("TEMPORARILY_UNAVAILABLE"), _outage("INTERNAL_ERROR"), _refused],
                         ids=["503", "500", "connection_refused"])
def test_an_outage_raises_instead_of_reading_as_no_history_or_no_champion(client, tmp_path, monkeypatch, fault):
    import requests

    _registered_with_history(client, tmp_path)
    assert registry.previous_champion(client, "fraud-detector") == "1"
    monkeypatch.setattr(client, "get_registered_model", fault)
    for read in (registry.history, registry.previous_champion, registry.status):
        with pytest.raises((MlflowException, requests.exceptions.ConnectionError)):
            read(client, "fraud-detector")
    monkeypatch.setattr(client, "get_model_version_by_alias", fault)
    with pytest.raises((MlflowException, requests.exceptions.ConnectionError)):
        registry.version_by_alias(client, "fraud-detector", registry.CHAMPION)


def test_rollback_and_configure_raise_on_an_outage_and_name_a_missing_version(store, monkeypatch):
    from sluicegate.config import Settings
    from sluicegate.ship.promote import rollback

    settings = Settings()
    with pytest.raises(ValueError, match="has no version 7"):  # genuinely missing
        rollback(settings, "7", actor="test", reason="test")
    monkeypatch.setattr(MlflowClient, "get_model_version", _outage())
    with pytest.raises(MlflowException, match="503"):  # not "has no version 7"
        rollback(settings, "7", actor="test", reason="test")
    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", lambda self, name: None)
    monkeypatch.setattr(MlflowClient, "create_experiment", _outage())
    with pytest.raises(MlflowException, match="503"):  # not "created meanwhile by a concurrent run"
        registry.configure(settings)


# --- register is idempotent: a retry finds the version its run already created ---

def _versions(client, name="fraud-detector"):
    return client.search_model_versions(f"name='{name}'")


def test_registering_the_same_run_twice_leaves_one_version(store, tmp_path):
    import mlflow

    path = _tiny_onnx(tmp_path / "m.onnx")
    with mlflow.start_run() as run:
        info = registry.log_onnx_model(path)
        first = registry.register_candidate(store, "fraud-detector", info, run.info.run_id, path, {"variant": "fp32"})
        again = registry.log_onnx_model(path)  # a retried register stage logs the same ONNX once more
        second = registry.register_candidate(store, "fraud-detector", again, run.info.run_id, path,
                                             {"variant": "fp32"})
    assert second.version == first.version and second.source == first.source
    assert [v.version for v in _versions(store)] == [first.version]
    assert registry.version_by_alias(store, "fraud-detector", registry.CHALLENGER).version == first.version
    with mlflow.start_run() as other:  # another run is another version
        info = registry.log_onnx_model(path)
        third = registry.register_candidate(store, "fraud-detector", info, other.info.run_id, path, {})
    assert int(third.version) == int(first.version) + 1 and len(_versions(store)) == 2
    with mlflow.start_run(run_id=run.info.run_id):  # a late retry of the first run does not move challenger back
        assert registry.register_candidate(store, "fraud-detector", info, run.info.run_id, path,
                                           {}).version == first.version
    assert registry.version_by_alias(store, "fraud-detector", registry.CHALLENGER).version == third.version


def test_a_retry_after_a_lost_response_returns_the_version_already_created(store, tmp_path, monkeypatch):
    import mlflow
    import requests

    path = _tiny_onnx(tmp_path / "m.onnx")
    create, created = store.create_model_version, []

    def created_then_lost(*args, **kwargs):  # the registry created it; its answer never arrived
        created.append(create(*args, **kwargs))
        raise requests.exceptions.ConnectionError("('Connection aborted.', RemoteDisconnected('Remote end "
                                                  "closed connection without response'))")

    monkeypatch.setattr(store, "create_model_version", created_then_lost)
    with mlflow.start_run() as run:
        info = registry.log_onnx_model(path)
        with pytest.raises(requests.exceptions.ConnectionError):
            registry.register_candidate(store, "fraud-detector", info, run.info.run_id, path, {"variant": "fp32"})
        retried = registry.register_candidate(store, "fraud-detector", registry.log_onnx_model(path),
                                              run.info.run_id, path, {"variant": "fp32"})
    (lost,) = created
    assert retried.version == lost.version and retried.tags["sha256"] == lost.tags["sha256"]
    assert retried.tags["variant"] == "fp32" and retried.run_id == run.info.run_id
    assert [v.version for v in _versions(store)] == [lost.version]
    assert registry.version_by_alias(store, "fraud-detector", registry.CHALLENGER).version == lost.version


def test_register_raises_on_an_outage_instead_of_assuming_the_model_exists(store, tmp_path, monkeypatch):
    import mlflow

    path = _tiny_onnx(tmp_path / "m.onnx")
    monkeypatch.setattr(store, "create_registered_model", _outage())
    with mlflow.start_run() as run:
        info = registry.log_onnx_model(path)
        with pytest.raises(MlflowException, match="503"):
            registry.register_candidate(store, "fraud-detector", info, run.info.run_id, path, {})
