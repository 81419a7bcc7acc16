"""deploy and rollback: move `champion`, only through the gates or on an operator's word.

Both hold the `promote-<model>` slot (`flows.limits`), as the training pipeline's gate does, so two
promotions of one model never overlap on any machine. A deploy a gate blocked ends Failed, saying why.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from sluicegate.config import Settings, ensure_home
from sluicegate.flows.limits import PROMOTE, one_at_a_time
from sluicegate.flows.outcome import finish, gated_flow
from sluicegate.hardware import hardware
from sluicegate.policy import load_policy
from sluicegate.ship import promote
from sluicegate.spec import load_spec


@task(name="model-repository", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def publish_model_repository() -> str:
    """The champion as a Triton/KServe model repository, so the same artifact runs there too."""
    path = promote.publish_model_repository_stage()
    get_run_logger().info(f"model repository: {path}")
    return str(path)


@gated_flow(name="deploy", log_prints=True)
def deploy_flow(actor: str = "deploy") -> dict:
    """Gate the newest challenger against the champion; promote it if every gate passes (Failed when a
    gate blocked it; an in-process caller still gets the result, exit code included)."""
    settings = Settings()
    policy = load_policy(settings.gates_path)  # a broken policy fails before any work
    hardware(settings)  # so does a target whose provider is not installed: server_load would check another
    ensure_home(settings.paths)
    with one_at_a_time(PROMOTE, settings):
        outcome = promote.deploy_newest(settings, policy, load_spec(settings.spec_path), actor)
        if outcome.report:
            create_markdown_artifact(key="gate-decision", markdown=outcome.report,
                                     description=f"{settings.model_name} v{outcome.version}: {outcome.status}")
        get_run_logger().info(outcome.summary())
        if outcome.status == "promoted":
            publish_model_repository()
    return finish(outcome.to_dict() | {"report": outcome.report})


@flow(name="rollback", log_prints=True)
def rollback_flow(to_version: str | None = None, actor: str = "rollback",
                  reason: str = "manual rollback") -> dict:
    """Restore the previous champion, or a named version, and record who and why."""
    settings = Settings()
    ensure_home(settings.paths)
    with one_at_a_time(PROMOTE, settings):
        result = promote.rollback(settings, to_version, actor, reason)
        get_run_logger().info(f"rollback: {result['model']} champion v{result['from']} -> v{result['to']}")
        publish_model_repository()
    return result
