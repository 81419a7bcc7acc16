"""Prefect entrypoint (see prefect.yaml); the flow lives in `sluicegate.flows.pipeline`."""

from sluicegate.flows.pipeline import training_pipeline

__all__ = ["training_pipeline"]
