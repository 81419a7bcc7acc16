"""Any table through the loop: a real `sluicegate serve`, its prediction log, `sluicegate monitor` and
`sluicegate labels`, for tables of other shapes than the built-in example's.

The shapes cover the spec's grammar: an int, a string or no id; a timestamp (sent with and without
fractions of seconds, with and without a zone, in another zone) or none; bool, integer and string
categories; a nullable numeric sent as null; personal data (`pii: true` on the id, a category and a
number), which the log holds only as tokens or not at all. One small champion per shape (the stage functions, no
Prefect), shared by the shape's tests; nothing is written to a log by hand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from sluicegate.config import Settings, ensure_home
from tests.replay import model_server, sluicegate

REPO = Path(__file__).resolve().parents[2]
TRAIN_ROWS, TRAFFIC_ROWS = 2400, 150
START = pd.Timestamp("2018-10-28", tz="UTC")
CATEGORIES = {"term": [12, 24, 36], "region": ["north", "south", "east"]}
# How a caller may write one instant: with and without fractions, aware, naive (UTC), another zone.
TIME_TEXTS = (lambda t: t.isoformat(), lambda t: t.tz_convert(None).isoformat(),
              lambda t: t.floor("s").isoformat(), lambda t: t.floor("s").tz_convert(None).isoformat(),
              lambda t: t.tz_convert("Asia/Kolkata").isoformat())
SHAPES = {  # name: (id kind, timestamp)
    "int-id-timed": ("int", True),
    "string-id-timed": ("string", True),
    "no-id-no-timestamp": ("absent", False),
    "pii-string-id-timed": ("string", True),
}
PII = ("id", "region", "income")  # marked pii in the shapes named pii-*: hashed, hashed, left out


def loans(rows: int, id_kind: str, timed: bool, seed: int, start: pd.Timestamp) -> pd.DataFrame:
    """A car-loan table: integer, bool and string categories, a nullable amount, millisecond times."""
    rng = np.random.default_rng(seed)
    term = rng.choice(CATEGORIES["term"], rows)
    repaid = rng.random(rows) < 0.6
    region = rng.choice(CATEGORIES["region"], rows)
    amount, income = rng.lognormal(9, 0.6, rows), rng.lognormal(10.5, 0.4, rows)
    logit = -2.2 + 1.4 * (amount / income > 0.25) + 0.03 * (term - 24) - 1.2 * repaid + 0.6 * (region == "east")
    label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype("int64")
    amount[rng.random(rows) < 0.1] = np.nan
    frame = pd.DataFrame({"term": term, "repaid_before": repaid, "region": region, "loan_amount": amount,
                          "income": income, "defaulted": label})
    if timed:
        ms = np.sort(rng.integers(0, 3 * 86_400_000, rows))
        frame.insert(0, "ts", start + pd.to_timedelta(ms, unit="ms"))
    if id_kind == "int":
        frame.insert(0, "id", np.arange(rows, dtype="int64") + seed * 100_000)
    elif id_kind == "string":
        frame.insert(0, "id", [f"loan-{seed}-{i:05d}" for i in range(rows)])
    return frame


def loan_spec(name: str, id_kind: str, timed: bool, pii: bool = False) -> dict:
    columns = {"term": {"dtype": "int64", "categories": CATEGORIES["term"]}, "repaid_before": {"dtype": "bool"},
               "region": {"dtype": "string", "categories": CATEGORIES["region"]},
               "loan_amount": {"dtype": "float64", "nullable": True, "min": 0},
               "income": {"dtype": "float64", "min": 0}, "defaulted": {"dtype": "int64", "categories": [0, 1]}}
    table: dict = {"label": "defaulted", "positive": 1}
    if timed:
        columns, table["timestamp"] = {"ts": {"dtype": "timestamp"}, **columns}, "ts"
    if id_kind != "absent":
        columns, table["id"] = {"id": {"dtype": "int64" if id_kind == "int" else "string"}, **columns}, "id"
    for column in PII if pii else ():
        columns[column]["pii"] = True
    return {"spec_version": 1, "name": name, "table": table, "columns": columns,
            "features": {"numeric": ["loan_amount", "income"], "categorical": ["term", "repaid_before", "region"]}}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("any-table")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICEGATE_", "PREFECT_API_URL"))}
    return {**base, "WORK": str(work), "SLUICEGATE_HOME": str(work / "home"),
            "SLUICEGATE_GATES_PATH": str(REPO / "gates.yaml"), "SLUICEGATE_SERVE_LOG_FLUSH_S": "0.2",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def _train_champion(settings: Settings, table: Path) -> None:
    """Import the table as `sluicegate import` does, train a small model and make it champion with the
    lineage tags the monitor reads (no Prefect, no gates: the loop is under test, not the model)."""
    from sluicegate.data import batches, tables
    from sluicegate.features import stages as features_stages
    from sluicegate.ship import registry
    from sluicegate.ship.export import export_onnx
    from sluicegate.train import stages as train_stages
    from sluicegate.train.config import TrainConfig

    spec, paths = settings.spec, settings.paths
    ensure_home(paths)
    imported = tables.import_table(table, spec, paths.raw)
    feats = features_stages.feature_stage(settings, spec, batches.read_batch(imported.batch_dir))
    prepared = train_stages.prepare(feats.frame, spec)
    trained = train_stages.train_stage(prepared, spec, TrainConfig(max_epochs=2, hidden=16, device="cpu",
                                                                   precision="fp32"), paths.runs / "ckpt")
    onnx_path = export_onnx(trained.model, prepared.train, paths.runs / "model.onnx")
    client = registry.configure(settings)
    tags = {"batch_id": imported.batch_dir.name, "threshold": "0.3", "variant": "fp32",
            "train_window": prepared.splits.window("train", spec), "test_window": prepared.splits.window("test", spec)}
    with mlflow.start_run() as run:
        version = registry.register_candidate(client, settings.model_name, registry.log_onnx_model(onnx_path),
                                              run.info.run_id, onnx_path, tags)
    client.set_registered_model_alias(settings.model_name, registry.CHAMPION, version.version)


@pytest.fixture(scope="module", params=list(SHAPES))
def shape(request, env) -> dict:
    """A table of this shape imported, its champion trained; the env names its spec."""
    name = request.param
    id_kind, timed = SHAPES[name]
    work = Path(env["WORK"])
    spec_path = work / f"{name}.spec.yaml"
    spec_path.write_text(yaml.safe_dump(loan_spec(name, id_kind, timed, pii=name.startswith("pii-"))))
    table = work / f"{name}.parquet"
    loans(TRAIN_ROWS, id_kind, timed, seed=1, start=START).to_parquet(table)
    saved = {k: os.environ.get(k) for k in ("SLUICEGATE_HOME", "SLUICEGATE_GATES_PATH")}
    os.environ.update({k: env[k] for k in saved})
    try:
        _train_champion(Settings(home=Path(env["SLUICEGATE_HOME"]), spec_path=spec_path), table)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return {"name": name, "id": id_kind, "timed": timed, "spec": spec_path, "pii": name.startswith("pii-"),
            "env": {**env, "SLUICEGATE_SPEC_PATH": str(spec_path)}}


def _bodies(rows: pd.DataFrame, shape: dict) -> list[dict]:
    """/predict bodies as a caller writes them: JSON values, null for a missing amount, the id as the
    table has it, times in every way ISO 8601 allows."""
    bodies = []
    for i, record in enumerate(rows.to_dict("records")):
        body = {k: None if isinstance(v, float) and np.isnan(v) else v.item() if hasattr(v, "item") else v
                for k, v in record.items() if k not in ("defaulted", "ts")}
        if shape["timed"]:
            body["ts"] = TIME_TEXTS[i % len(TIME_TEXTS)](record["ts"])
        bodies.append(body)
    return bodies


@pytest.fixture(scope="module")
def served(shape) -> dict:
    """The day after training, through /predict of a real server; what it logged; its metrics."""
    traffic = loans(TRAFFIC_ROWS, shape["id"], shape["timed"], seed=2, start=START + pd.Timedelta(days=3))
    bodies = _bodies(traffic, shape)
    with model_server(shape["env"], shape["spec"]) as url, httpx.Client(base_url=url, timeout=10) as client:
        for body in bodies:
            answer = client.post("/predict", json=body)
            assert answer.status_code == 200, answer.text
        live = client.get("/v2/health/live").json()
        metrics = client.get("/metrics").text
    settings = Settings(home=Path(shape["env"]["SLUICEGATE_HOME"]), spec_path=shape["spec"])
    from sluicegate.operate.monitor import read_prediction_log

    log = read_prediction_log(settings.paths.predictions).frame  # as the monitor reads it
    return {"traffic": traffic, "bodies": bodies, "log": log, "live": live, "metrics": metrics,
            "settings": settings}


def test_every_answered_row_is_logged_with_its_id_and_instant(shape, served):
    traffic, log = served["traffic"], served["log"]
    assert len(log) == len(traffic), served["live"]
    assert "degraded" not in served["live"], served["live"]
    assert "sluicegate_prediction_log_dropped_total 0.0" in served["metrics"]
    expected_ids = [None] * len(traffic) if shape["id"] == "absent" else traffic["id"].astype(str).tolist()
    if shape["pii"]:  # the id the caller sent, as its token
        from sluicegate.serve.privacy import pseudonyms

        expected_ids = pseudonyms(served["settings"].spec, served["settings"].paths).tokens(expected_ids)
    assert sorted(log["request_id"].tolist(), key=str) == sorted(expected_ids, key=str)
    assert log["loan_amount"].isna().sum() == traffic["loan_amount"].isna().sum() > 0
    if shape["timed"]:  # every way of writing an instant is the same instant once read
        from sluicegate.operate.labels import utc_times

        sent = sorted(_instant(body["ts"]) for body in served["bodies"])
        assert utc_times(log["ts"]).sort_values().tolist() == sent


def test_personal_data_is_in_no_file_of_the_log(shape, served):
    if not shape["pii"]:
        pytest.skip("this shape declares no personal data")
    traffic, log, settings = served["traffic"], served["log"], served["settings"]
    from sluicegate.serve.privacy import pseudonyms

    tokens = pseudonyms(settings.spec, settings.paths)
    assert sorted(log["region"]) == sorted(tokens.tokens(traffic["region"]))  # one token per region
    assert log["region"].nunique() == traffic["region"].nunique()
    assert not {"income", "input.income", "input.region"} & set(log.columns)
    files = [p for p in settings.paths.predictions.rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        assert not [i for i in traffic["id"] if i.encode() in data], path
        assert not [r for r in CATEGORIES["region"] if r.encode() in data], path
        assert not [v for v in traffic["income"] if np.float64(v).tobytes() in data], path


def _instant(text: str) -> pd.Timestamp:
    when = pd.Timestamp(text)
    return when.tz_localize("UTC") if when.tzinfo is None else when.tz_convert("UTC")


def test_monitor_reads_the_log_of_any_shape(shape, served):
    """The pii shape too: drift on a category's tokens read back, quality checks on what the log keeps."""
    out = sluicegate("monitor", "--no-trigger", "--spec", str(shape["spec"]), env=shape["env"])
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["status"] == "checked" and report["rows"] == TRAFFIC_ROWS, report
    assert report["unlogged"] == 0 and report["quarantined"] == [], report
    assert report["quality_passed"] is True, report.get("quality_failures")
    assert report["estimate"]["rows"] == TRAFFIC_ROWS


def test_late_labels_meet_their_predictions_by_the_id_the_caller_sent(shape, served):
    spec_columns = ["id", "defaulted"] if shape["id"] != "absent" else []
    if not spec_columns:  # no id was sent: a label has nothing to meet, and meets nothing
        labels = served["traffic"].assign(row_id=[f"unsent-{i}" for i in range(TRAFFIC_ROWS)])[["row_id", "defaulted"]]
    else:
        labels = served["traffic"][spec_columns]
    path = Path(shape["env"]["WORK"]) / f"{shape['name']}-labels.csv"
    labels.to_csv(path, index=False)
    out = sluicegate("labels", str(path), "--spec", str(shape["spec"]), "--report", "--json", env=shape["env"])
    live = json.loads(out.stdout.strip().splitlines()[-1])["live"]
    joinable = 0 if shape["id"] == "absent" else TRAFFIC_ROWS  # a prediction without an id cannot be labelled
    assert live["predictions"] == joinable and live["labelled"] == joinable, live
