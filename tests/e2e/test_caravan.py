"""A new table judged by its own standards: ISLP's `Caravan` (5,822 customers, 85 columns, 6% buy)
drafted by `sluicegate init` (its spec and its gates file, from its label rate and the baselines'
figures) and run with those gates through the real CLI: promoted, above both baselines, judged by
its own PR-AUC floor rather than the 0.3 the project's gates.yaml sets for the card example."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from sluicegate.config import Settings
from tests.replay import fetch_example, sluicegate

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples/caravan"


@pytest.fixture(scope="module")
def csv() -> Path:
    return fetch_example(EXAMPLE)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("caravan")
    shutil.copy(REPO / "gates.yaml", work / "gates.yaml")  # the project policy init drafts from
    (work / "expectations").mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICEGATE_", "PREFECT_API_URL"))}
    return {**base, "WORK": str(work), "SLUICEGATE_HOME": str(work / "home")}


@pytest.fixture(scope="module")
def drafted(csv, env) -> Path:
    spec = Path(env["WORK"]) / "caravan.spec.yaml"
    sluicegate("init", str(csv), "--out", str(spec), "--name", "caravan", "--label", "Purchase", env=env)
    return spec


def test_init_drafts_the_committed_example_and_a_gates_file_of_the_tables_own_figures(drafted):
    assert yaml.safe_load(drafted.read_text()) == yaml.safe_load((EXAMPLE / "spec.yaml").read_text())
    gates = (drafted.parent / "caravan.gates.yaml").read_text()
    committed = yaml.safe_load((EXAMPLE / "caravan.gates.yaml").read_text())
    assert yaml.safe_load(gates).keys() == committed.keys()
    assert yaml.safe_load(gates)["min_pr_auc"] < 0.3  # its own floor, not the card example's
    assert "label rate 0.0598" in gates and "logistic_regression" in gates and "hist_gradient_boosting" in gates


def test_run_with_its_drafted_gates_is_promoted_above_both_baselines(csv, drafted, env):
    sluicegate("import", str(csv), "--spec", str(drafted), env=env)
    ran = sluicegate("run", "--spec", str(drafted), env=env, check=False)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    client = MlflowClient(Settings(spec_path=drafted, home=Path(env["SLUICEGATE_HOME"])).tracking_uri)
    version = client.get_model_version_by_alias("caravan", "champion")
    report = json.loads(Path(client.download_artifacts(version.run_id, "gate_report.json", env["WORK"])).read_text())
    gates = {g["gate"]: g for g in report["gates"]}
    lift = gates["min_lift_over_baseline"]
    assert report["promote"] and lift["passed"] and lift["measured"] > 0, lift
    assert "logistic_regression" in lift["detail"] and "hist_gradient_boosting" in lift["detail"]
    assert gates["min_pr_auc"]["passed"] and gates["min_pr_auc"]["threshold"] < 0.3  # the drafted floor
