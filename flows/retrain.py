"""Prefect entrypoint (see prefect.yaml); the flow lives in `sluicegate.flows.retrain`."""

from sluicegate.flows.retrain import scheduled_retrain

__all__ = ["scheduled_retrain"]
