"""monitor: read the prediction log since the last run -> drift, data quality and live
precision/recall against the champion's training reference -> report -> maybe retrain.

The statistics and the trigger rules live in `sluicegate.operate.monitor`; this flow reads,
publishes artifacts and, when a threshold is crossed, starts `training-pipeline`
through the Prefect API with a dedupe key, at most once per cooldown.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from sluicegate import runtime
from sluicegate.config import Settings, ensure_home
from sluicegate.data import batches as data
from sluicegate.data import validate as validation
from sluicegate.features import store as features
from sluicegate.features.inputs import build_model_input
from sluicegate.operate import ingest
from sluicegate.operate import monitor as mon
from sluicegate.policy import load_policy
from sluicegate.ship import registry
from sluicegate.spec import DatasetSpec, load_spec

RETRAIN_TAG = "drift-retrain"
ACTIVE_STATES = ("SCHEDULED", "PENDING", "RUNNING")


class MonitorParams(BaseModel):
    """What the Prefect UI shows as the monitor's run form."""

    trigger: bool = Field(True, description="Start training-pipeline when drift or decay crosses gates.yaml drift:")
    deployment: str = Field("training-pipeline/training-pipeline", description="Deployment the trigger starts")
    window_days: int = Field(14, ge=1, le=365, description="Days of newest raw partitions a triggered retrain uses")
    expectations: str = Field("expectations", description="Great Expectations context folder (data quality)")


@task(name="reference-profile", cache_policy=NO_CACHE)
def reference_profile(settings: Settings, spec: DatasetSpec, client, champion) -> mon.ReferenceProfile:
    """The champion's training window, binned; computed once per champion version and cached."""
    cached = settings.paths.monitoring / f"reference-v{champion.version}.json"
    if cached.exists():
        return mon.ReferenceProfile.from_json(cached.read_text())
    batch_id = champion.tags.get("batch_id")
    batch = data.read_batch(settings.paths.raw / batch_id)
    customer, merchant = features.compute_feature_tables(batch, spec)
    ref = mon.reference_frame(batch, customer, merchant, spec, mon.parse_window(champion.tags.get("train_window")))
    onnx_path = registry.download_onnx(client, champion, settings.paths.monitoring / f"champion-v{champion.version}")
    profile = mon.build_profile(ref, spec, champion.version, batch_id, scores=_score(onnx_path, ref, spec))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(profile.to_json())
    return profile


def _score(onnx_path: Path, frame: pd.DataFrame, spec: DatasetSpec) -> np.ndarray:
    session = runtime.make_session(onnx_path, providers=["CPUExecutionProvider"])
    return runtime.onnx_predict(session, build_model_input(frame, spec))


@task(name="data-quality", cache_policy=NO_CACHE)
def data_quality(log: pd.DataFrame, spec: DatasetSpec, context_root: Path) -> tuple[bool, list[str]]:
    """The same GX suite as the training gate, on the logged raw columns."""
    frame = mon.quality_frame(log, spec)
    ts = frame[spec.timestamp].dropna()
    start = ts.min() if len(ts) else pd.Timestamp.now(tz="UTC")
    end = (ts.max() if len(ts) else start) + pd.Timedelta(seconds=1)
    report = validation.validate_batch(frame, spec, f"live-{datetime.now(UTC):%Y%m%dT%H%M%S}", start, end,
                                       context_root)
    failures = mon.quality_failures(report.failures, log, spec)
    return not failures, failures


def _deployment_and_active_runs(name: str):
    """The deployment to trigger (None if not registered) and its drift-triggered runs still in flight."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None, 0
        # Explicit sort and limit: Prefect 3.8.8's client sends nulls otherwise, which the server
        # rejects on fastapi 0.154 (422).
        runs = client.read_flow_runs(
            sort=FlowRunSort.ID_DESC, limit=100, offset=0,
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE_STATES)),
                                          tags=FlowRunFilterTags(all_=[RETRAIN_TAG])))
    return deployment, len(runs)


@task(name="trigger-retrain", cache_policy=NO_CACHE)
def trigger_retrain(settings: Settings, params: MonitorParams, decision: mon.TriggerDecision) -> str:
    """Assemble the newest window and start training-pipeline on it; the dedupe key makes a repeat a no-op."""
    from prefect.deployments import run_deployment

    window = ingest.assemble_window(settings.paths.raw, params.window_days)
    get_run_logger().info(window.summary())
    actor = ("monitor: " + "; ".join(decision.reasons))[:500]
    run = run_deployment(params.deployment, parameters={"params": {"batch": window.batch_id, "actor": actor}},
                         timeout=0, tags=[RETRAIN_TAG], idempotency_key=decision.key,
                         flow_run_name=f"drift-retrain-{window.batch_id}")
    return str(run.id)


def _publish(settings: Settings, report: mon.DriftReport, decision: mon.TriggerDecision,
             thresholds: mon.DriftThresholds) -> str:
    """The report as Prefect artifacts (table + markdown) and as an MLflow run with the plot."""
    markdown = report.to_markdown(decision)
    create_table_artifact(key="drift-report", table=report.table(),
                          description=f"PSI per column vs. champion v{report.reference_version}")
    create_markdown_artifact(key="drift-summary", markdown=markdown, description=decision.summary())
    registry.configure(settings)
    plot = mon.plot_drift(report, thresholds, settings.paths.monitoring / "drift.png")
    with mlflow.start_run(run_name="monitor", tags={"kind": "monitor",
                                                      "reference_version": report.reference_version,
                                                      "decision": decision.summary()[:4900]}) as run:
        mlflow.log_metrics({f"psi_{c['column']}": c["psi"] for c in report.table()} | {"rows": report.rows})
        if report.live is not None and report.live.recall is not None:
            mlflow.log_metrics({"live_recall": report.live.recall, "live_precision": report.live.precision or 0.0})
        mlflow.log_dict(report.to_dict(), "drift_report.json")
        mlflow.log_text(markdown, "drift_report.md")
        mlflow.log_artifact(str(plot))
    return run.info.run_id


@flow(name="monitor", log_prints=True)
def monitor(params: MonitorParams | None = None) -> dict:
    """Drift, data quality and live metrics on the traffic since the last run; retrain if warranted."""
    params = params or MonitorParams()
    logger = get_run_logger()
    settings = Settings()
    ensure_home(settings.paths)
    spec = load_spec(settings.spec_path)
    thresholds = load_policy(settings.gates_path).drift
    with mon.locked_state(settings.paths.monitoring / "state.json") as state:
        since = pd.Timestamp(state.last_run_at) if state.last_run_at else None
        log = mon.read_prediction_log(settings.paths.predictions, since)
        if log.empty:
            msg = f"no traffic since {since or 'the start of the log'}: nothing to monitor"
            logger.info(msg)
            return {"status": "no_traffic", "reason": msg, "rows": 0}
        state.last_run_at = str(log[mon.LOGGED_AT].max())
        client = registry.configure(settings)
        champion = registry.version_by_alias(client, settings.model_name, registry.CHAMPION)
        if champion is None:
            msg = f"{len(log):,} predictions but no champion to compare them with"
            logger.info(msg)
            return {"status": "no_champion", "reason": msg, "rows": len(log)}
        profile = reference_profile(settings, spec, client, champion)
        report = mon.drift_report(log, profile, thresholds, since)
        report.quality_passed, report.quality_failures = data_quality(log, spec, Path(params.expectations))
        threshold = float(champion.tags.get("threshold", 0.5))
        report.live = mon.live_metrics(log, mon.read_labels(settings.paths.labels, spec), spec, threshold)
        decision, run_id = _decide_and_trigger(settings, params, report, thresholds, state)
    mlflow_run = _publish(settings, report, decision, thresholds)
    logger.info(decision.summary())
    return {"status": "triggered" if decision.fire else "checked", "reason": decision.summary(),
            "rows": report.rows, "flow_run_id": run_id, "mlflow_run_id": mlflow_run,
            "drifting": [c.name for c in report.columns if c.status == "drift"],
            "quality_passed": report.quality_passed}


def _decide_and_trigger(settings, params, report, thresholds, state) -> tuple[mon.TriggerDecision, str | None]:
    now = datetime.now(UTC)
    deployment, active = (None, 0)
    if params.trigger:
        deployment, active = _deployment_and_active_runs(params.deployment)
    decision = mon.decide_trigger(report, thresholds, state, now, active_runs=active)
    if not decision.fire:
        return decision, None
    if not params.trigger:
        decision.fire, decision.suppressed = False, "triggering is off for this run (trigger=false)"
        return decision, None
    if deployment is None:
        decision.fire = False
        decision.suppressed = f"deployment {params.deployment!r} is not registered (run `make up`)"
        return decision, None
    run_id = trigger_retrain(settings, params, decision)
    mon.record_trigger(state, decision, now, run_id)
    return decision, run_id
