"""monitor, in the order it runs:

0. retention: predictions and labels older than the spec's `table.retention` are deleted
1. read the prediction log since the last run (the watermark lives under SLUICEGATE_HOME/monitoring)
2. reference: the champion's training window, binned once per champion version
3. check: drift (PSI, chi-square, the score's PSI) against alert levels calibrated on reference
   windows like the live one, data quality (the training gate's GX suite), live precision and recall
   on late labels, each model version's CBPE estimate against its band
4. decide: a threshold of the `drift:` block of gates.yaml crossed -> start `training-pipeline`
   through the Prefect API with a dedupe key, at most once per cooldown
5. publish: Prefect artifacts and an MLflow run with the plot

The rules live in `sluicegate.operate.stages`; this flow adds Prefect: tasks, artifacts, the API.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from sluicegate.config import Settings, ensure_home
from sluicegate.operate import stages as operate
from sluicegate.policy import load_policy
from sluicegate.spec import load_spec

RETRAIN_TAG = "drift-retrain"
ACTIVE_STATES = ("SCHEDULED", "PENDING", "RUNNING")


class MonitorParams(BaseModel):
    """What the Prefect UI shows as the monitor's run form."""

    trigger: bool = Field(True, description="Start training-pipeline when drift or decay crosses gates.yaml drift:")
    deployment: str = Field("training-pipeline/training-pipeline", description="Deployment the trigger starts")
    window_days: int = Field(14, ge=1, le=365, description="Days of newest raw partitions a triggered retrain uses")
    expectations: str = Field("expectations", description="Great Expectations context folder (data quality)")


class PrefectTrigger:
    """Starts the retrain deployment through the Prefect API."""

    def __init__(self, settings: Settings, params: MonitorParams):
        self.settings, self.params, self.name = settings, params, params.deployment

    def active_runs(self) -> int | None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
            FlowRunFilterTags,
        )
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as client:
            try:
                deployment = client.read_deployment_by_name(self.name)
            except ObjectNotFound:
                return None
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=ACTIVE_STATES)),
                    tags=FlowRunFilterTags(all_=[RETRAIN_TAG])))
        return len(runs)

    def fire(self, decision) -> str:
        return trigger_retrain(self.settings, self.params, decision)


@task(name="trigger-retrain", cache_policy=NO_CACHE)
def trigger_retrain(settings: Settings, params: MonitorParams, decision) -> str:
    """Assemble the newest window and start training-pipeline on it; the dedupe key makes a repeat a no-op."""
    from prefect.deployments import run_deployment

    window = operate.retrain_window(settings, params.window_days)
    get_run_logger().info(window.summary())
    actor = ("monitor: " + "; ".join(decision.reasons))[:500]
    run = run_deployment(params.deployment, parameters={"params": {"batch": window.batch_id, "actor": actor}},
                         timeout=0, tags=[RETRAIN_TAG], idempotency_key=decision.key,
                         flow_run_name=f"drift-retrain-{window.batch_id}")
    return str(run.id)


@task(name="apply-retention", cache_policy=NO_CACHE)
def apply_retention(settings: Settings) -> operate.RetentionOutcome:
    return operate.retention_stage(settings, load_spec(settings.spec_path))


@task(name="check-traffic", cache_policy=NO_CACHE)
def check_traffic(settings: Settings, params: MonitorParams, thresholds) -> operate.MonitorOutcome:
    trigger = PrefectTrigger(settings, params) if params.trigger else None
    return operate.monitor_stage(settings, load_spec(settings.spec_path), thresholds, Path(params.expectations),
                                 trigger)


@task(name="publish-report", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def publish(settings: Settings, outcome: operate.MonitorOutcome, thresholds) -> str:
    """The report as Prefect artifacts (table + markdown) and as an MLflow run with the plot."""
    report, decision = outcome.report, outcome.decision
    create_table_artifact(key="drift-report", table=report.table(),
                          description=f"PSI per column vs. champion v{report.reference_version}")
    create_markdown_artifact(key="drift-summary", markdown=report.to_markdown(decision),
                             description=decision.summary())
    return operate.record_report(settings, report, decision, thresholds)


@flow(name="monitor", log_prints=True)
def monitor(params: MonitorParams | None = None) -> dict:
    """Drift, data quality and live metrics on the traffic since the last run; retrain if warranted."""
    params = params or MonitorParams()
    settings = Settings()
    ensure_home(settings.paths)
    thresholds = load_policy(settings.gates_path).drift  # read once; a broken policy fails before any work
    # Before the check: what the spec says may no longer be kept is neither kept nor read.
    kept = apply_retention(settings)
    get_run_logger().info(kept.summary())
    outcome = check_traffic(settings, params, thresholds)
    get_run_logger().info(outcome.summary())
    result = outcome.to_dict() | {"retention": kept.to_dict()}
    if outcome.report is None:
        return result
    return result | {"mlflow_run_id": publish(settings, outcome, thresholds)}
