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
