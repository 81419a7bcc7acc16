"""The model the server runs is the model the gate measured: a whole day of traffic after the training
batch, every event sent to `/predict` in time order through a real `sluicegate serve` with two worker
processes, gets every aggregate equal to the offline point-in-time value that training computes for it
once the day lands as a batch; the served PR-AUC equals the offline one. Then a batch that replaces
the training days lands, and the next day is served from the replaced state, as offline reads it.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score

from sluicegate.config import Settings, ensure_home
from sluicegate.data.batches import write_batch
from sluicegate.data.synthetic import GenerateConfig, generate_transactions
from sluicegate.features import stages as features_stages
from sluicegate.features.inputs import build_model_input
from sluicegate.operate import skew
from sluicegate.runtime import make_session, onnx_predict
from sluicegate.ship import registry
from sluicegate.ship.export import export_onnx
from sluicegate.spec import load_spec
from sluicegate.train import stages as train_stages
from sluicegate.train.config import TrainConfig
from tests.replay import model_server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ROWS, DAYS, SEED = 24_000, 5, 11
CONNECTIONS = 4  # the callers' connections, spread over the server's workers


def _batch(start: str, seed: int = SEED) -> GenerateConfig:
    return GenerateConfig(rows=ROWS, days=DAYS, seed=seed, start=start)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Batch one landed (raw partitions, feature stage, online state) and a small champion trained on it."""
    work = tmp_path_factory.mktemp("parity")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICEGATE_", "PREFECT_API_URL"))}
    env |= {"WORK": str(work), "SLUICEGATE_HOME": str(work / "home"), "SLUICEGATE_GATES_PATH": str(REPO / "gates.yaml"),
            "SLUICEGATE_SERVE_WORKERS": "2", "SLUICEGATE_SERVE_LOG_FLUSH_S": "0.2"}
    old = {k: os.environ.get(k) for k in ("SLUICEGATE_HOME", "SLUICEGATE_GATES_PATH")}
    os.environ.update({k: env[k] for k in old})
    settings = Settings()
    ensure_home(settings.paths)
    spec = load_spec()
    first = _land(settings, spec, generate_transactions(_batch("2026-10-01"), spec), _batch("2026-10-01").batch_id)
    prepared = train_stages.prepare(first.frame, spec)
    trained = train_stages.train_stage(prepared, spec, TrainConfig(max_epochs=2, hidden=32, device="cpu",
                                                               precision="fp32"), work / "ckpt")
    onnx_path = export_onnx(trained.model, prepared.train, work / "model.onnx")
    client = registry.configure(settings)
    with mlflow.start_run() as run:
        info = registry.log_onnx_model(onnx_path)
        version = registry.register_candidate(client, settings.model_name, info, run.info.run_id, onnx_path,
                                              {"threshold": "0.5", "variant": "fp32"})
    client.set_registered_model_alias(settings.model_name, registry.CHAMPION, version.version)
    yield {"env": env, "settings": settings, "spec": spec, "session": make_session(onnx_path), "checked": {}}
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _land(settings: Settings, spec, rows: pd.DataFrame, batch_id: str):
    """A batch as the pipeline lands it: day partitions under raw/, then the feature stage."""
    write_batch(rows, settings.paths.raw, batch_id, spec.timestamp)
    return features_stages.feature_stage(settings, spec, rows)


def _next_day(start: str) -> pd.DataFrame:
    """Every transaction of the day that starts at `start`, of the same customers and merchants."""
    spec = load_spec()
    day = generate_transactions(_batch(start), spec)
    return day[day[spec.timestamp] < pd.Timestamp(start, tz="UTC") + pd.Timedelta(days=1)].reset_index(drop=True)


def _serve_in_time_order(env: dict, rows: pd.DataFrame) -> None:
    """Each row through /predict in time order, as a card network sends them, over several connections."""
    spec = load_spec()
    fields = [spec.id, *spec.request_columns]
    with model_server(env) as url:
        clients = [httpx.Client(base_url=url, timeout=30) for _ in range(CONNECTIONS)]
        try:
            for i, record in enumerate(rows.sort_values(spec.timestamp, kind="stable")[fields].to_dict("records")):
                body = {k: (v.isoformat() if isinstance(v, pd.Timestamp) else v.item() if hasattr(v, "item") else v)
                        for k, v in record.items()}
                answer = clients[i % CONNECTIONS].post("/predict", json=body)
                assert answer.status_code == 200, answer.text
        finally:
            for client in clients:
                client.close()


def _served(settings: Settings, spec, ids: pd.Series) -> pd.DataFrame:
    logged = pd.read_parquet(settings.paths.predictions / "predict")
    assert logged["request_id"].isin(ids).sum() == len(ids), "every request is in the prediction log"
    return logged.drop_duplicates("request_id", keep="last").set_index("request_id").loc[ids.to_numpy()]


def _check_parity(world: dict, day: pd.DataFrame) -> dict:
    """Serve the day, land it as a batch, compare what was served with its offline features."""
    settings, spec = world["settings"], world["spec"]
    _serve_in_time_order(world["env"], day)
    served = _served(settings, spec, day[spec.id])
    landed = _land(settings, spec, day, f"day-{day[spec.timestamp].min():%Y-%m-%d}")
    offline = landed.frame.set_index(spec.id).loc[day[spec.id].to_numpy()]
    agreement = {}
    for name in (a.feature_name for a in spec.features.aggregates):
        a, b = served[name].to_numpy(float), offline[name].to_numpy(float)
        same = np.isclose(a, b, rtol=1e-6, atol=1e-9) | (np.isnan(a) & np.isnan(b))
        agreement[name] = same.mean()
    y = spec.positive(offline[spec.label]).to_numpy()
    offline_scores = onnx_predict(world["session"], build_model_input(offline.reset_index(), spec))
    return {"agreement": agreement, "served_pr_auc": average_precision_score(y, served["probability"]),
            "offline_pr_auc": average_precision_score(y, offline_scores), "y": y,
            "production": _production_skew(world)}


def _production_skew(world: dict) -> skew.ProductionSkew:
    """The monitor's check of what landed since its last run, as its next run makes it."""
    return skew.production_skew(world["settings"], world["spec"], world["checked"], on_this_spec=lambda version: True)


def test_a_day_of_traffic_is_served_the_offline_point_in_time_features(world):
    day = _next_day("2026-10-06")
    assert len(day) > 3000 and day[world["spec"].label].sum() > 20
    found = _check_parity(world, day)
    assert all(share == 1.0 for share in found["agreement"].values()), found["agreement"]
    assert abs(found["served_pr_auc"] - found["offline_pr_auc"]) <= 0.01, found
    production = found["production"]  # the monitor's own check agrees: every served input as training's
    assert production.served == len(day) and not production.skewed, production.detail()


def test_after_a_batch_replaces_the_training_days_the_next_day_is_served_from_the_replacement(world):
    settings, spec = world["settings"], world["spec"]
    replacement = _batch("2026-10-01", seed=SEED + 1)  # a corrected re-import of the same days
    landed = _land(settings, spec, generate_transactions(replacement, spec), replacement.batch_id)
    assert landed.online_events > 0
    day = _next_day("2026-10-07")
    found = _check_parity(world, day)
    assert all(share == 1.0 for share in found["agreement"].values()), found["agreement"]
    assert abs(found["served_pr_auc"] - found["offline_pr_auc"]) <= 0.01, found
    production = found["production"]
    assert production.served == len(day) and not production.skewed, production.detail()


def test_a_served_period_that_lands_with_other_values_is_a_monitor_finding(world):
    """Skew in production: the monitor recomputes the inputs of every served row once its day lands and
    compares them with what the server logged. The days above landed as served: every input equal. This
    one lands corrected upstream (other amounts on some rows than the server was sent): the amount on
    those rows, and the amount's aggregates of later events of their customers, are named."""
    settings, spec = world["settings"], world["spec"]
    day = _next_day("2026-10-08").sort_values(spec.timestamp, kind="stable").iloc[:800].reset_index(drop=True)
    _serve_in_time_order(world["env"], day)
    corrected = day.copy()
    changed = np.arange(len(day)) % 20 == 7  # 40 of 800 rows
    corrected.loc[changed, "amount"] = corrected.loc[changed, "amount"] * 3 + 10
    _land(settings, spec, corrected, "day-2026-10-08-corrected")

    found = _production_skew(world)
    assert found.partitions == ["day-2026-10-08-corrected/2026-10-08"] and found.served == len(day)
    by_name = {f.name: f for f in found.features}
    amount = by_name["input.amount"]
    assert round(amount.differing * found.served) == changed.sum() and amount.largest_gap > 0
    assert {f.name for f in found.skewed} <= {n for n in by_name if "amount" in n}, found.detail()
    assert "input.amount differs on" in found.detail()
    unchanged = [f for n, f in by_name.items() if "amount" not in n]
    assert unchanged and all(f.differing == 0 for f in unchanged), found.detail()
