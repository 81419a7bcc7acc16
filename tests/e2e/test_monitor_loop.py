"""The monitoring loop on real traffic: a real `sluicegate serve` logs what it answers through v2 and
/predict, and `sluicegate monitor` reads that log; no prediction log is written by hand.

Two batches of the example table (the second trained with the first as history), a champion, then
replays: the day after training, monitored after every 3 hours, warrants no retrain; held-out rows of
the training distribution give no drift; 3 hours of each drift kind the generator has (amount,
category, country) are flagged with the drifting columns named as the retrain's reason.
Late labels imported with `sluicegate labels` then give live precision and recall, which the CBPE
estimate made before they arrived is within a stated tolerance of.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest
import yaml

from sluicegate.config import HomePaths, Settings
from sluicegate.data.batches import write_batch
from sluicegate.data.synthetic import GenerateConfig, generate_transactions
from sluicegate.spec import load_spec
from tests.replay import model_server, predict_rows, sluicegate

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ROWS, DAYS, SEED = 40_000, 6, 21
# CBPE on a calibrated model: estimated precision and recall within this of the measured ones.
CBPE_TOLERANCE = 0.15


def _batch(start: str, drift: str = "none") -> GenerateConfig:
    return GenerateConfig(rows=ROWS, days=DAYS, seed=SEED, start=start, drift=drift)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("loop")
    policy = yaml.safe_load((REPO / "gates.yaml").read_text()) | {"latency_slo_p99_ms": 1000.0}  # shared machine
    (work / "gates.yaml").write_text(yaml.safe_dump(policy))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICEGATE_", "PREFECT_API_URL"))}
    return {**base, "WORK": str(work), "SLUICEGATE_HOME": str(work / "home"),
            "SLUICEGATE_GATES_PATH": str(work / "gates.yaml"), "SLUICEGATE_SERVE_LOG_FLUSH_S": "0.2"}


@pytest.fixture(scope="module")
def settings(env) -> Settings:
    return Settings(home=Path(env["SLUICEGATE_HOME"]))


@pytest.fixture(scope="module")
def champion(env, settings) -> dict:
    """Batch one, then batch two trained with batch one as its history; its model is champion (its tags)."""
    spec = load_spec()
    paths = HomePaths(settings.home, spec.name)
    for cfg in (_batch("2026-10-01"), _batch("2026-10-07")):
        write_batch(generate_transactions(cfg, spec), paths.raw, cfg.batch_id, spec.timestamp)
    ran = sluicegate("run", "--batch", _batch("2026-10-07").batch_id, "--max-epochs", "6", env=env, check=False)
    assert ran.returncode in (0, 3), ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "windows reached back over" in ran.stdout + ran.stderr  # batch two saw batch one
    from sluicegate.ship import registry

    client = registry.configure(settings)
    name = settings.model_name
    if registry.version_by_alias(client, name, registry.CHAMPION) is None:
        # The gates may block a model of this little data; the monitor only needs a champion.
        version = registry.version_by_alias(client, name, registry.CHALLENGER)
        client.set_registered_model_alias(name, registry.CHAMPION, version.version)
    return dict(registry.version_by_alias(client, name, registry.CHAMPION).tags)


def _infer(url: str, settings: Settings, rows: pd.DataFrame, chunk: int = 100) -> None:
    """The rows' point-in-time features from the offline store, as v2 tensors (how a v2 caller
    scores: it builds the model's inputs with the same builder)."""
    from sluicegate.features import retrieval
    from sluicegate.features.inputs import build_model_input

    spec = load_spec()
    inputs = build_model_input(retrieval.offline_features(settings, spec, rows), spec)
    with httpx.Client(base_url=url, timeout=10) as client:
        for start in range(0, len(rows), chunk):
            numeric, categorical = inputs.numeric[start:start + chunk], inputs.categorical[start:start + chunk]
            body = {"id": f"replay-{start}", "inputs": [
                {"name": "numeric", "shape": list(numeric.shape), "datatype": "FP32", "data": numeric.ravel().tolist()},
                {"name": "categorical", "shape": list(categorical.shape), "datatype": "INT64",
                 "data": categorical.ravel().tolist()}]}
            answer = client.post(f"/v2/models/{settings.model_name}/infer", json=body)
            assert answer.status_code == 200, answer.text


def _monitor(env: dict) -> dict:
    out = sluicegate("monitor", "--no-trigger", env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _held_out(settings: Settings, champion: dict) -> pd.DataFrame:
    """The champion's test window: rows of its training batch it never trained on."""
    from sluicegate.data.batches import read_batch
    from sluicegate.operate.monitor import parse_window

    spec = load_spec()
    start, end = parse_window(champion["test_window"])
    batch = read_batch(HomePaths(settings.home, spec.name).raw / champion["batch_id"])
    when = pd.to_datetime(batch[spec.timestamp], utc=True)
    return batch[(when >= start) & (when <= end)].reset_index(drop=True)


def _after_training(cfg: GenerateConfig) -> pd.DataFrame:
    """Traffic arriving after the training batch: every row of the next day, in time order (a whole
    day, so no hour is over-represented; every row, as a live server sees every event)."""
    spec = load_spec()
    batch = generate_transactions(cfg, spec)
    when = pd.to_datetime(batch[spec.timestamp], utc=True)
    return batch[when < pd.Timestamp(cfg.start, tz="UTC") + pd.Timedelta(days=1)].sort_values(spec.timestamp,
                                                                                               kind="stable")


def _logged(settings: Settings) -> int:
    """Rows the server has written to its /predict log so far (parquet footers only)."""
    import pyarrow.parquet as pq

    folder = HomePaths(settings.home, load_spec().name).predictions / "predict"
    return sum(pq.read_metadata(f).num_rows for f in folder.rglob("*.parquet") if not f.name.startswith("."))


def _await_logged(settings: Settings, rows: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while _logged(settings) < rows:
        assert time.monotonic() < deadline, f"the server logged {_logged(settings)} of {rows} rows"
        time.sleep(0.1)


def test_steady_traffic_monitored_every_three_hours_calls_for_no_retrain(env, settings, champion):
    """The monitor run after every 3 hours of the day after training: its levels come from the
    reference's 3-hour windows of the same hours, so no block warrants a retrain (asked of every block,
    the night's too, although fewer than min_rows would not trigger one anyway)."""
    from sluicegate.operate import monitor as mon
    from sluicegate.operate import stages as operate
    from sluicegate.policy import load_policy

    spec = load_spec()
    thresholds = load_policy(Path(env["SLUICEGATE_GATES_PATH"])).drift
    traffic = _after_training(_batch("2026-10-13"))
    blocks = (pd.to_datetime(traffic[spec.timestamp], utc=True).dt.hour // 3).to_numpy()
    called = {}
    with model_server(env) as url:
        _monitor_in_process(settings, spec, thresholds, env, operate)  # the earlier tests' rows, if any
        for block, rows in traffic.groupby(blocks, sort=True):
            before = _logged(settings)
            predict_rows(url, rows)
            _await_logged(settings, before + len(rows))
            outcome = _monitor_in_process(settings, spec, thresholds, env, operate)
            assert outcome.rows == len(rows), outcome.summary()
            called[f"{int(block) * 3:02d}h"] = mon.retrain_reasons(outcome.report, thresholds)
    assert {hour: reasons for hour, reasons in called.items() if reasons} == {}, called


def _monitor_in_process(settings, spec, thresholds, env, operate):
    """The monitor's own stage on the real log (no Prefect flow around it: the loop is under test)."""
    return operate.monitor_stage(settings, spec, thresholds, Path(env["WORK"]) / "expectations", None)


def test_held_out_traffic_through_both_endpoints_shows_no_drift(env, settings, champion):
    held_out = _held_out(settings, champion)
    with model_server(env) as url:
        _infer(url, settings, held_out)
        traffic = _after_training(_batch("2026-10-13"))
        predict_rows(url, traffic)
    calm = _monitor(env)
    assert calm["rows"] == len(held_out) + len(traffic)
    assert calm["status"] == "checked" and calm["drifting"] == [], calm
    assert calm["reason"].startswith("no retrain"), calm

    # Labels arrive later: live precision and recall, and the estimate made before is close to them.
    spec = load_spec()
    labels = Path(env["WORK"]) / "labels.csv"
    traffic[[spec.id, spec.label]].to_csv(labels, index=False)
    reported = sluicegate("labels", str(labels), "--report", "--json", env=env)
    report = json.loads(reported.stdout.strip().splitlines()[-1])
    live = report["live"]
    assert live["labelled"] == len(traffic) and live["positives"] > 20
    assert live["precision"] is not None and live["recall"] is not None
    assert calm["estimate"]["rows"] == calm["rows"]  # the monitor estimated before any label arrived
    # CBPE from the same predictions' scores (what the monitor estimates before labels), against the labels.
    errors = {row["metric"]: row["abs_error"] for row in report["comparison"]}
    assert errors["precision"] <= CBPE_TOLERANCE and errors["recall"] <= CBPE_TOLERANCE, report["comparison"]


@pytest.mark.parametrize(("drift", "columns"), [("amount", {"amount", "input.amount"}),
                                                ("category", {"merchant_category", "input.merchant_category"}),
                                                ("country", {"country", "input.country"})])
def test_three_hours_of_drifted_traffic_warrant_a_retrain_naming_the_drifting_columns(env, settings, champion,
                                                                                      drift, columns):
    """Each drift kind the generator has, in a block of 3 hours (what the monitor sees between two of
    its runs), against the levels of the reference's 3-hour windows."""
    day = _after_training(_batch("2026-10-13", drift=drift))
    hours = pd.to_datetime(day[load_spec().timestamp], utc=True).dt.hour
    with model_server(env) as url:
        predict_rows(url, day[(hours >= 12) & (hours < 15)])
    flagged = _monitor(env)
    assert columns <= set(flagged["drifting"]), flagged
    assert "retrain warranted" in flagged["reason"] and f"{sorted(columns)[0]} PSI" in flagged["reason"], flagged
