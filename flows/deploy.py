"""Prefect entrypoint (see prefect.yaml); the flow lives in `sluicegate.flows.deploy`."""

from sluicegate.flows.deploy import deploy_flow, rollback_flow

__all__ = ["deploy_flow", "rollback_flow"]
