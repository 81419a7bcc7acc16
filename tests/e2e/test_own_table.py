"""Bring your own table, as a user would: ISLP's public `Default` table (no timestamp, no entity, a
Yes/No label) from CSV to a served champion through the real CLI (`init`, `import`, `run`, `status`,
`serve`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import yaml

from tests.replay import fetch_example, model_server, sluicegate

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples/default"


@pytest.fixture(scope="module")
def csv() -> Path:
    return fetch_example(EXAMPLE)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("own-table")
    policy = yaml.safe_load((REPO / "gates.yaml").read_text()) | {"latency_slo_p99_ms": 1000.0}  # shared machine
    # The MLP ranks below a logistic regression on this small, linear table (docs/gates.md), which the
    # baseline gate rightly blocks; this file is about a table's own flow, the gate has its own tests.
    policy["min_lift_over_baseline"] = None
    (work / "gates.yaml").write_text(yaml.safe_dump(policy))
    (work / "expectations").mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICEGATE_", "PREFECT_API_URL"))}
    return {**base, "WORK": str(work), "SLUICEGATE_HOME": str(work / "home"),
            "SLUICEGATE_GATES_PATH": str(work / "gates.yaml")}


@pytest.fixture(scope="module")
def drafted(csv, env) -> Path:
    spec = Path(env["WORK"]) / "default.spec.yaml"
    sluicegate("init", str(csv), "--out", str(spec), "--name", "default", env=env)
    return spec


def test_init_writes_the_committed_example_spec(drafted):
    """The example under examples/ is exactly what `sluicegate init` writes, unedited."""
    assert yaml.safe_load(drafted.read_text()) == yaml.safe_load((EXAMPLE / "spec.yaml").read_text())


@pytest.fixture(scope="module")
def promoted(csv, drafted, env) -> dict:
    imported = sluicegate("import", str(csv), "--spec", str(drafted), env=env)
    assert "row_id` derived" in imported.stderr + imported.stdout
    sluicegate("run", "--spec", str(drafted), "--max-epochs", "12", env=env)
    return json.loads(sluicegate("status", "--spec", str(drafted), "--json", env=env).stdout)


def test_the_drafted_spec_runs_end_to_end_unchanged_and_ranks_far_above_the_label_rate(promoted):
    champion = promoted["champion"]
    assert champion is not None and promoted["last_gate_decision"]["promote"]
    assert champion["metrics"]["pr_auc"] > 0.3  # the label rate is 3.3%
    assert [m["name"] for m in promoted["models"]] == ["default"]


def test_the_champion_answers_predict_with_the_specs_own_columns(promoted, drafted, env):
    with model_server(env, drafted) as url:
        low = httpx.post(f"{url}/predict", json={"student": "No", "balance": 300.0, "income": 40000.0}).json()
        high = httpx.post(f"{url}/predict", json={"student": "Yes", "balance": 2500.0, "income": 15000.0}).json()
        assert low["model_name"] == "default" and 0 <= low["probability"] < high["probability"] <= 1
        assert high["positive"] is True and low["positive"] is False
        bad = httpx.post(f"{url}/predict", json={"student": "Maybe", "balance": 300.0})
        assert bad.status_code == 422
        assert {d["field"] for d in bad.json()["details"]} == {"student", "income"}
        schema = httpx.get(f"{url}/openapi.json").json()["paths"]["/predict"]["post"]["requestBody"]
        properties = schema["content"]["application/json"]["schema"]["properties"]
        assert set(properties) == {"row_id", "student", "balance", "income"}


@pytest.fixture(scope="module")
def second(csv, drafted, promoted, env) -> Path:
    """A second table in the same install: the same CSV declared with fewer features, its own model."""
    spec = yaml.safe_load(drafted.read_text())
    spec["name"] = "default-balance"
    spec["features"] = {"numeric": ["balance"], "categorical": ["student"]}
    # Its own gate file beside it (named by the spec's `gates` key): a looser calibration bound.
    spec["gates"] = "balance.gates.yaml"
    policy = yaml.safe_load(Path(env["SLUICEGATE_GATES_PATH"]).read_text()) | {"max_ece": 0.05}
    work = Path(env["WORK"])
    (work / "balance.gates.yaml").write_text(yaml.safe_dump(policy))
    path = work / "balance.spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    own_gates = {k: v for k, v in env.items() if k != "SLUICEGATE_GATES_PATH"}
    sluicegate("import", str(csv), "--spec", str(path), env=own_gates)
    sluicegate("run", "--spec", str(path), "--max-epochs", "12", env=own_gates)
    return path


def test_one_server_serves_each_specs_champion_under_its_own_name(second, drafted, env):
    status = json.loads(sluicegate("status", "--spec", str(second), "--json", env=env).stdout)
    assert {m["name"] for m in status["models"]} == {"default", "default-balance"}
    with model_server(env, drafted, second) as url:
        ready = httpx.get(f"{url}/v2/health/ready").json()
        assert [m["name"] for m in ready["models"]] == ["default", "default-balance"]
        widths = {}
        for name in ("default", "default-balance"):
            meta = httpx.get(f"{url}/v2/models/{name}").json()
            assert meta["name"] == name
            widths[name] = {i["name"]: i["shape"][1] for i in meta["inputs"]}
            assert httpx.get(f"{url}/v2/models/{name}/ready").json()["ready"] is True
        # Each model keeps its own tensor contract.
        assert widths["default-balance"]["numeric"] < widths["default"]["numeric"]
        infer = httpx.post(f"{url}/v2/models/default-balance/infer", json={"inputs": [
            {"name": name, "shape": [1, width], "datatype": "FP32" if name == "numeric" else "INT64",
             "data": [0] * width} for name, width in widths["default-balance"].items()]})
        assert infer.status_code == 200, infer.text
        assert infer.json()["model_name"] == "default-balance"
        row = {"student": "Yes", "balance": 2500.0, "income": 15000.0}
        assert httpx.post(f"{url}/predict", json=row).json()["model_name"] == "default"
        lite = httpx.post(f"{url}/predict/default-balance", json={"student": "Yes", "balance": 2500.0})
        assert lite.status_code == 200 and lite.json()["model_name"] == "default-balance"
        # The default model still needs its own columns; the second one does not.
        assert httpx.post(f"{url}/predict/default", json={"student": "Yes", "balance": 2500.0}).status_code == 422
        unknown = httpx.post(f"{url}/predict/churn", json=row)
        assert unknown.status_code == 404 and "'default-balance'" in unknown.json()["error"]
        paths = httpx.get(f"{url}/openapi.json").json()["paths"]
        body = paths["/predict/default-balance"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert set(body["properties"]) == {"row_id", "student", "balance"}
    # Each model's predictions land in its own table's folder.
    tables = Path(env["SLUICEGATE_HOME"]) / "tables"
    assert list((tables / "default-balance" / "predictions").rglob("*.parquet"))


def test_bad_tables_are_refused_naming_the_column(csv, drafted, env):
    work = Path(env["WORK"])
    lines = csv.read_text().splitlines()
    (work / "odd.csv").write_text("\n".join([lines[0], lines[1].replace("No,No", "No,Perhaps", 1)]))
    odd = sluicegate("import", str(work / "odd.csv"), "--spec", str(drafted), env=env, check=False)
    assert odd.returncode == 2 and "'student' has values outside its categories" in odd.stderr
    assert "'Perhaps': 1" in odd.stderr
    (work / "three.csv").write_text("\n".join([lines[0], "No,No,1,2", "Yes,No,1,2", "Maybe,No,1,2"]))
    three = sluicegate("init", str(work / "three.csv"), "--label", "default", env=env, check=False)
    assert three.returncode == 2 and "label 'default' has 3 distinct values" in three.stderr
