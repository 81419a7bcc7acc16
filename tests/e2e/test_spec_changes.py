"""A table's life: its spec changes under a served champion. ISLP's `Default` table through the real CLI
(`import`, `run`, `status`, `rollback`), with one real model server running throughout on the spec it
was started with: each change trains fresh, both models are compared on their own inputs, and the
server follows the champion's input contract, there and back."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from sluicegate.config import Settings
from tests.e2e.test_own_table import EXAMPLE, REPO, csv  # noqa: F401 (csv: the fetched table, a fixture)
from tests.replay import model_server, sluicegate

pytestmark = pytest.mark.e2e

EPOCHS = "12"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("spec-changes")
    policy = yaml.safe_load((REPO / "gates.yaml").read_text()) | {"latency_slo_p99_ms": 1000.0}  # shared machine
    policy["min_lift_over_baseline"] = None  # a logistic regression wins on this table (docs/gates.md)
    # A team that drops a feature accepts a small loss for it: this file is about a spec's changes
    # reaching the server (each gate has its own tests).
    policy |= {"max_ece": 0.05, "max_regression_vs_champion": 0.05, "max_slice_regression": 0.1}
    (work / "gates.yaml").write_text(yaml.safe_dump(policy))
    (work / "expectations").mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICEGATE_", "PREFECT_API_URL"))}
    return {**base, "WORK": str(work), "SLUICEGATE_HOME": str(work / "home"),
            "SLUICEGATE_GATES_PATH": str(work / "gates.yaml"), "SLUICEGATE_SERVE_POLL_INTERVAL_S": "0.5"}


def _spec(env: dict, name: str, change) -> Path:
    """The example's spec with `change` applied to its parsed YAML, written under the test's folder."""
    raw = yaml.safe_load((EXAMPLE / "spec.yaml").read_text())
    change(raw)
    path = Path(env["WORK"]) / f"{name}.spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _run(env: dict, spec: Path) -> tuple[str, dict]:
    """`sluicegate run` (promoted: exit 0, blocked: exit 3); its output and the table's status, with
    the run's whole gate report (an artifact of the version's run in MLflow) under "report"."""
    out = sluicegate("run", "--spec", str(spec), "--max-epochs", EPOCHS, env=env, check=False)
    assert out.returncode in (0, 3), f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    status = json.loads(sluicegate("status", "--spec", str(spec), "--json", env=env).stdout)
    client = MlflowClient(Settings(spec_path=spec, home=Path(env["SLUICEGATE_HOME"])).tracking_uri)
    newest = max(client.search_model_versions("name='default'"), key=lambda v: int(v.version))
    report = client.download_artifacts(newest.run_id, "gate_report.json", env["WORK"])
    status["report"] = json.loads(Path(report).read_text()) | {"version": newest.version}
    assert status["report"]["promote"] == (out.returncode == 0)
    return out.stdout + out.stderr, status


def _gate(status: dict, name: str) -> dict:
    return next(g for g in status["report"]["gates"] if g["gate"] == name)


def _served(url: str, version: str, seconds: float = 60) -> dict:
    """The v2 metadata once the server serves `version` (it polls the registry every 0.5 s)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        meta = httpx.get(f"{url}/v2/models/default").json()
        if meta.get("versions") == [version]:
            return meta
        time.sleep(0.2)
    raise AssertionError(f"the server still serves {meta.get('versions')}, not v{version}")


def _widths(meta: dict) -> dict[str, int]:
    return {i["name"]: i["shape"][1] for i in meta["inputs"]}


def _schema(url: str) -> set[str]:
    doc = httpx.get(f"{url}/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]
    return set(doc["content"]["application/json"]["schema"]["properties"])


ROW = {"student": "Yes", "balance": 2500.0, "income": 15000.0}


@pytest.fixture(scope="module")
def server(csv, env):  # noqa: F811 (the imported fixture)
    """The first champion on the example's spec, and a model server started on that spec."""
    spec = Path(env["WORK"]) / "default.spec.yaml"
    shutil.copy(EXAMPLE / "spec.yaml", spec)
    sluicegate("import", str(csv), "--spec", str(spec), env=env)
    _, status = _run(env, spec)
    assert status["report"]["promote"], status["report"]
    with model_server(env, spec) as url:
        yield {"url": url, "spec": spec, "widths": _widths(httpx.get(f"{url}/v2/models/default").json())}


def test_a_changed_transform_trains_fresh_and_compares_each_model_on_its_own_inputs(server, env):
    def log_balance(raw):
        raw["features"]["numeric"] = [{"column": "balance", "transform": "log1p"}, "income"]

    output, status = _run(env, _spec(env, "log-balance", log_balance))
    assert "trained from scratch: the model spec changed" in output
    row = _gate(status, "model_spec")
    assert row["measured"] >= 1 and "balance" in row["detail"] and "log1p" in row["detail"]
    assert "each model scored on its own inputs" in row["detail"]
    comparison = _gate(status, "max_regression_vs_champion")
    assert comparison["measured"] is not None and "vs champion" in comparison["detail"]
    decision = status["report"]
    # Promoted or blocked, the decision says why: every gate that failed is named with its measurement.
    failed = [g for g in decision["gates"] if not g["passed"]]
    assert decision["promote"] == (not failed)
    assert all(g["detail"] for g in failed)


@pytest.fixture(scope="module")
def dropped(server, env) -> dict:
    def no_income(raw):
        raw["features"]["numeric"] = ["balance"]

    spec = _spec(env, "no-income", no_income)
    _, status = _run(env, spec)
    assert status["report"]["promote"], status["report"]
    return {"spec": spec, "version": str(status["champion"]["version"])}


def test_a_champion_without_a_feature_is_served_on_its_own_contract(server, dropped):
    url = server["url"]
    meta = _served(url, dropped["version"])
    assert _widths(meta)["numeric"] < server["widths"]["numeric"]
    lite = httpx.post(f"{url}/predict", json={"student": "Yes", "balance": 2500.0})
    assert lite.status_code == 200, lite.text
    assert lite.json()["model_version"] == dropped["version"]
    assert "income" not in _schema(url)
    old = httpx.post(f"{url}/predict", json=ROW)
    assert old.status_code == 422 and "income" in old.text
    infer = httpx.post(f"{url}/v2/models/default/infer", json={"inputs": [
        {"name": name, "shape": [1, width], "datatype": "FP32" if name == "numeric" else "INT64",
         "data": [0] * width} for name, width in _widths(meta).items()]})
    assert infer.status_code == 200 and infer.json()["model_version"] == dropped["version"]


def test_a_rollback_across_the_contract_change_serves_the_old_contract_again(server, dropped, env):
    url = server["url"]
    _served(url, dropped["version"])
    sluicegate("rollback", "--spec", str(dropped["spec"]), "--reason", "income is back", env=env)
    status = json.loads(sluicegate("status", "--spec", str(dropped["spec"]), "--json", env=env).stdout)
    restored = str(status["champion"]["version"])
    assert restored != dropped["version"]
    assert _widths(_served(url, restored)) == server["widths"]
    assert "income" in _schema(url)
    answer = httpx.post(f"{url}/predict", json=ROW)
    assert answer.status_code == 200 and answer.json()["model_version"] == restored
    lite = httpx.post(f"{url}/predict", json={"student": "Yes", "balance": 2500.0})
    assert lite.status_code == 422 and "income" in lite.text


def test_an_added_feature_and_a_changed_category_list_are_served_when_promoted(server, dropped, env):
    def more(raw):
        raw["features"]["ratios"] = [{"numerator": "balance", "denominator": "income"}]
        raw["columns"]["student"]["categories"] = ["No", "Yes", "Unknown"]

    url = server["url"]
    serving = httpx.get(f"{url}/v2/models/default").json()
    _, status = _run(env, _spec(env, "more", more))
    row = _gate(status, "model_spec")
    assert "ratios" in row["detail"] and "Unknown" in row["detail"]
    if not status["report"]["promote"]:  # blocked with reasons: the old champion serves on
        assert [g for g in status["report"]["gates"] if not g["passed"]]
        assert httpx.get(f"{url}/v2/models/default").json() == serving
        return
    meta = _served(url, str(status["champion"]["version"]))
    assert _widths(meta)["numeric"] > _widths(serving)["numeric"]  # the ratio (and its missing flag)
    answer = httpx.post(f"{url}/predict", json={**ROW, "student": "Unknown"})
    assert answer.status_code == 200 and answer.json()["model_version"] == str(status["champion"]["version"])
