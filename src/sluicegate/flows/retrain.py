"""scheduled-retrain: ingest the newest days into a window batch, then run
training-pipeline on it as a subflow (every gate applies as usual)."""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from sluicegate.config import Settings, ensure_home
from sluicegate.flows.pipeline import PipelineParams, training_pipeline
from sluicegate.operate import ingest


class RetrainParams(BaseModel):
    """What the Prefect UI shows as the nightly retrain's run form."""

    window_days: int = Field(14, ge=1, le=365, description="Train on the newest N days of raw partitions")
    max_epochs: int = Field(20, ge=1, le=200, description="Upper bound on training epochs")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Training precision")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Training device")


@task(name="ingest", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def ingest_window(settings: Settings, days: int) -> dict:
    window = ingest.assemble_window(settings.paths.raw, days)
    get_run_logger().info(window.summary())
    return ingest.describe(window)


@flow(name="scheduled-retrain", log_prints=True)
def scheduled_retrain(params: RetrainParams | None = None) -> dict:
    """Sliding-window retrain: newest days in, gated candidate out."""
    params = params or RetrainParams()
    settings = Settings()
    ensure_home(settings.paths)
    window = ingest_window(settings, params.window_days)
    result = training_pipeline(PipelineParams(batch=window["batch_id"], max_epochs=params.max_epochs,
                                              precision=params.precision, device=params.device,
                                              actor="scheduled-retrain"))
    return {**result, "window": window}
