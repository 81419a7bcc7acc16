"""scheduled-retrain: ingest the newest days into a window batch, then run
training-pipeline on it as a subflow (every gate applies as usual). A window a gate
blocked ends this run Failed too, with the reasons; the subflow records the outcome in
the retrain ledger."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from sluicegate.config import Settings, ensure_home
from sluicegate.flows.outcome import finish, gated_flow
from sluicegate.flows.pipeline import SCHEDULED_ACTOR, PipelineParams, training_pipeline
from sluicegate.operate import stages as operate
from sluicegate.train.config import TrainConfig


class RetrainParams(TrainConfig):
    """What the Prefect UI shows as the nightly retrain's run form: the training settings and the window."""

    window_days: int = Field(14, ge=1, le=365, description="Train on the newest N days of raw partitions")


@task(name="ingest", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def ingest_window(settings: Settings, days: int) -> dict:
    window = operate.retrain_window(settings, days)
    get_run_logger().info(window.summary())
    return window.to_dict()


@gated_flow(name="scheduled-retrain", log_prints=True)
def scheduled_retrain(params: RetrainParams | None = None) -> dict:
    """Sliding-window retrain: newest days in, gated candidate out (Failed when a gate blocked it)."""
    params = params or RetrainParams()
    settings = Settings()
    ensure_home(settings.paths)
    window = ingest_window(settings, params.window_days)
    training = params.model_dump(include=set(TrainConfig.model_fields))
    result = training_pipeline(PipelineParams(**training, batch=window["batch_id"], actor=SCHEDULED_ACTOR))
    return finish({**result, "window": window})
