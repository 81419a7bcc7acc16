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


def _run_options() -> set[str]:
    import typer.main

    return {p.name for p in typer.main.get_command(app).commands["run"].params}


def test_run_options_the_prefect_forms_and_the_training_settings_are_the_same_fields():
    from sluicegate.flows.pipeline import PipelineParams
    from sluicegate.flows.retrain import RetrainParams
    from sluicegate.train.config import TrainConfig

    training = set(TrainConfig.model_fields)
    assert {"patience", "compile", "distill", "max_epochs", "model"} <= training
    assert training <= _run_options()
    assert training <= set(PipelineParams.model_json_schema()["properties"])
    assert training <= set(RetrainParams.model_json_schema()["properties"])
    # what the CLI adds beyond the training settings is exactly what the run form adds
    run_only = _run_options() - training - {"spec"}  # the table: an environment setting in the flows
    form_only = set(PipelineParams.model_fields) - training - {"actor", "expectations"}
    assert run_only == form_only


def test_run_rejects_a_bad_training_setting_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("SLUICEGATE_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["run", "--patience", "0"])
    assert result.exit_code == 2
    assert "patience" in result.output


def test_status_names_every_registered_model_with_its_champion(home):
    """The text form `make demo` prints, on a real MLflow store: a champion alias is shown as its version."""
    from sluicegate.config import Settings
    from sluicegate.ship import registry

    client = registry.configure(Settings())
    for name in ("claims-model", "fraud-detector"):
        client.create_registered_model(name)
        client.create_model_version(name, source=str(home / "artifact"), run_id=None)
    client.set_registered_model_alias("claims-model", registry.CHAMPION, "1")
    result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    assert "models in this registry: claims-model (champion v1), fraud-detector (champion none)" in result.output


def _missing(provider: str) -> bool:
    import onnxruntime

    return provider not in onnxruntime.get_available_providers()


def test_run_with_a_target_whose_provider_is_missing_fails_before_any_work(tmp_path, monkeypatch):
    import pytest

    if not _missing("MIGraphXExecutionProvider"):
        pytest.skip("this onnxruntime has MIGraphX")
    monkeypatch.setenv("SLUICEGATE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SLUICEGATE_TARGET", "cpu")  # restored after: the command exports its --target for the flows
    result = CliRunner().invoke(app, ["run", "--target", "rocm"])
    assert result.exit_code == 2, result.output
    assert "MIGraphXExecutionProvider is not available" in result.output and "onnxruntime-migraphx" in result.output
    assert not (tmp_path / "home").exists()  # nothing was imported, trained or registered


def test_deploy_on_a_target_whose_provider_is_missing_fails_before_any_gate(tmp_path, monkeypatch):
    import pytest

    if not _missing("CUDAExecutionProvider"):
        pytest.skip("this onnxruntime has the CUDA execution provider")
    monkeypatch.setenv("SLUICEGATE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SLUICEGATE_TARGET", "cuda")
    result = CliRunner().invoke(app, ["deploy"])
    assert result.exit_code == 2, result.output
    assert "CUDAExecutionProvider is not available" in result.output and "onnxruntime-gpu" in result.output
