"""Prefect entrypoint (see prefect.yaml); the flow lives in `sluicegate.flows.monitor`."""

from sluicegate.flows.monitor import monitor

__all__ = ["monitor"]
