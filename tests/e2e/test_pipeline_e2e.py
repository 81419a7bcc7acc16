"""The whole flow on a small batch, against Prefect's test server, MLflow on
SQLite, Feast local and Great Expectations: promotion, re-run, and a faulted batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from sluicegate.config import Settings
from sluicegate.data.batches import read_batch, write_batch
from sluicegate.data.synthetic import GenerateConfig, generate_transactions, inject_fault

pytestmark = pytest.mark.e2e

ROWS, DAYS = 24_000, 8


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def e2e_home(tmp_path_factory, prefect_server):
    from tests.conftest import REPO
    root = tmp_path_factory.mktemp("e2e")
    home = root / "home"
    # The repository's policy, except latency: other processes on a shared test machine make
    # Server-scenario p99 noisy, and the latency gate has its own test.
    policy = yaml.safe_load((REPO / "gates.yaml").read_text()) | {"latency_slo_p99_ms": 1000.0}
    (root / "gates.yaml").write_text(yaml.safe_dump(policy))
    env = {"SLUICEGATE_HOME": str(home), "SLUICEGATE_GATES_PATH": str(root / "gates.yaml")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _write(spec, cfg: GenerateConfig) -> str:
    frame = inject_fault(generate_transactions(cfg, spec), cfg.fault, spec, cfg.seed)
    write_batch(frame, Settings().paths.raw, cfg.batch_id, spec.timestamp)
    return cfg.batch_id


def _status() -> dict:
    out = subprocess.run([sys.executable, "-m", "sluicegate", "status", "--json"], capture_output=True,
                         text=True, check=True, env=os.environ.copy())
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def first_run(e2e_home, spec_module):
    from sluicegate.flows.pipeline import PipelineParams, training_pipeline
    batch = _write(spec_module, GenerateConfig(rows=ROWS, days=DAYS, seed=21))
    result = training_pipeline(PipelineParams(batch=batch, max_epochs=8))
    return batch, result


@pytest.fixture(scope="module")
def spec_module():
    from sluicegate.spec import load_spec
    return load_spec()


def test_clean_batch_ends_as_champion(first_run):
    batch, result = first_run
    assert result["status"] == "promoted", result["reason"]
    status = _status()
    champion = status["champion"]
    assert str(champion["version"]) == str(result["version"])
    assert champion["variant"] in ("fp32", "int8", "int8_qdq") and len(champion["sha256"]) == 64
    # Label rate is about 2%: a useful model ranks far above chance.
    assert champion["metrics"]["pr_auc"] > 0.3
    assert status["last_gate_decision"]["promote"] is True
    repository = Settings().paths.model_repository / "fraud-detector"
    assert (repository / str(result["version"]) / "model.onnx").exists() and (repository / "config.pbtxt").exists()
    report = open(result["gate_report"]).read()
    assert "PROMOTE" in report and "max_regression_vs_champion" in report
    # The test window replayed through the serving feature path: every served feature equal to training's.
    assert "| max_serving_skew | 0.001 | 0 | pass | every feature equal on all" in report, report


def test_the_run_answers_with_seconds_and_peak_memory_per_stage(first_run):
    _, result = first_run
    stages = ["validate", "features", "train", "export", "evaluate", "serving-parity", "register", "gate"]
    assert list(result["stage_seconds"]) == list(result["stage_peak_gb"]) == stages
    # Each stage's own high-water mark: above the imports of the process, below the machine.
    assert all(0.2 < gb < 24 for gb in result["stage_peak_gb"].values()), result["stage_peak_gb"]


def test_version_carries_lineage_tags(first_run):
    from mlflow import MlflowClient
    batch, result = first_run
    settings = Settings()
    version = MlflowClient(settings.tracking_uri).get_model_version(settings.model_name, str(result["version"]))
    for tag in ("batch_id", "data_hash", "feature_service", "git_commit", "prefect_flow_run_id",
                "gate_decision", "sha256", "variant", "threshold"):
        assert version.tags.get(tag), tag
    assert version.tags["batch_id"] == batch


def test_registered_artifact_is_the_variant_the_gate_chose(first_run):
    from pathlib import Path

    from sluicegate.runtime import sha256_file
    _, result = first_run
    champion = _status()["champion"]
    assert champion["variant"] == result["variant"] == result["decision"]["variant"]
    shipped = Path(result["work_dir"]) / f"model_{result['variant']}.onnx"
    assert sha256_file(shipped) == champion["sha256"]
    others = [p for p in Path(result["work_dir"]).glob("model_*.onnx") if p != shipped]
    assert others and all(sha256_file(p) != champion["sha256"] for p in others)


def test_a_cpu_run_names_the_provider_and_the_cpu_that_ran_it(first_run):
    """Evidence, benchmark rows, the gate report, the model card and the MLflow params all say what ran."""
    from pathlib import Path

    import mlflow
    import onnxruntime
    from mlflow import MlflowClient

    from sluicegate.hardware import cpu_model
    _, result = first_run
    work = Path(result["work_dir"])
    evidence = json.loads((work / "evidence" / "evidence.json").read_text())
    shipped, cpu = evidence["shipped"], cpu_model() or ""
    assert evidence["hardware"]["provider"] == shipped["provider"] == "CPUExecutionProvider"
    assert shipped["device"].startswith(cpu) and onnxruntime.__version__ in shipped["onnxruntime"]
    ran = {(r["provider"], r["ran_on"]) for r in evidence["benchmark"]}
    assert ran == {("CPUExecutionProvider", shipped["device"])}
    where = f"on CPUExecutionProvider, {shipped['device']}, {shipped['onnxruntime']}"
    assert where in open(result["gate_report"]).read()
    settings = Settings()
    client = MlflowClient(settings.tracking_uri)
    version = client.get_model_version(settings.model_name, str(result["version"]))
    card = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="model_card.md",
                                                    dst_path=str(work / "card")))
    assert f"Measured on CPUExecutionProvider ({shipped['device']}; " in card.read_text()
    (run,) = client.search_runs([client.get_experiment_by_name(settings.experiment).experiment_id],
                                f"tags.mlflow.parentRunId = '{result['mlflow_run_id']}' "
                                "and params.`hardware.provider` = 'CPUExecutionProvider'")
    assert run.data.params["hardware.device"] == shipped["device"]
    assert run.data.params["hardware.shipped_provider"] == "CPUExecutionProvider"


def test_rerun_on_same_data_makes_no_second_champion(first_run):
    from sluicegate.flows.pipeline import PipelineParams, training_pipeline
    batch, result = first_run
    again = training_pipeline(PipelineParams(batch=batch, max_epochs=8))
    assert again["status"] == "unchanged"
    assert str(_status()["champion"]["version"]) == result["version"]


def test_faulted_batch_is_quarantined_and_champion_untouched(first_run, spec_module):
    _, result = first_run
    before = _status()["champion"]
    cfg = GenerateConfig(rows=ROWS, days=DAYS, seed=22, fault="duplicates")
    batch = _write(spec_module, cfg)
    env = os.environ.copy()
    proc = subprocess.run([sys.executable, "-m", "sluicegate", "run", "--batch", batch, "--max-epochs", "2"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    said = " ".join(proc.stderr.split())
    assert "Blocked at validation" in said and "quarantine" in said
    quarantined = Settings().paths.quarantine / batch
    assert (quarantined / "validation_report.json").exists() and (quarantined / "validation_report.md").exists()
    assert len(read_batch(quarantined)) == len(inject_fault(generate_transactions(cfg, spec_module),
                                                            "duplicates", spec_module, cfg.seed))
    assert not (Settings().paths.raw / batch).exists()
    failed = json.loads((quarantined / "validation_report.json").read_text())
    assert any(f["column"] == spec_module.id for f in failed["failures"])
    assert _status()["champion"] == before
