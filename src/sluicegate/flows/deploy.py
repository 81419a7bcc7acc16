"""deploy and rollback: move `champion`, only through the gates or on an operator's word."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from sluicegate.config import Settings, ensure_home
from sluicegate.flows.pipeline import publish_model_repository
from sluicegate.policy import load_policy
from sluicegate.ship import promote as deploy
from sluicegate.spec import load_spec


@flow(name="deploy", log_prints=True)
def deploy_flow(actor: str = "deploy") -> dict:
    """Gate the newest challenger against the champion; promote it if every gate passes."""
    settings = Settings()
    policy = load_policy(settings.gates_path)  # a broken policy fails before any work
    ensure_home(settings.paths)
    outcome = deploy.deploy_newest(settings, policy, load_spec(settings.spec_path), actor)
    if outcome.report:
        create_markdown_artifact(key="gate-decision", markdown=outcome.report,
                                 description=f"{settings.model_name} v{outcome.version}: {outcome.status}")
    get_run_logger().info(f"deploy: {outcome.status}: {outcome.reason}")
    if outcome.status == "promoted":
        publish_model_repository()
    return outcome.to_dict() | {"report": outcome.report}


@flow(name="rollback", log_prints=True)
def rollback_flow(to_version: str | None = None, actor: str = "rollback",
                  reason: str = "manual rollback") -> dict:
    """Restore the previous champion, or a named version, and record who and why."""
    settings = Settings()
    ensure_home(settings.paths)
    result = deploy.rollback(settings, to_version, actor, reason)
    get_run_logger().info(f"rollback: {result['model']} champion v{result['from']} -> v{result['to']}")
    publish_model_repository()
    return result
