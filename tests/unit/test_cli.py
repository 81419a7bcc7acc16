import socket

from typer.testing import CliRunner

from sluicegate.cli import app


def test_status_with_mlflow_down_says_so_in_one_line(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("SLUICEGATE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SLUICEGATE_MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    result = CliRunner().invoke(app, ["status", "--json"])
    assert result.exit_code == 1
    assert "the MLflow registry did not answer" in result.output and f"127.0.0.1:{port}" in result.output
    assert "Traceback" not in result.output
