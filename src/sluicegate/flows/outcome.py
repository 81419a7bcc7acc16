"""How a run that a gate blocked ends: in Prefect state Failed, saying why.

A blocked candidate is a failed promotion, and nobody should see it green in the Prefect UI or API,
whichever way the run was started (a deployment run, the nightly retrain, the monitor's trigger, the
CLI, `make deploy`). Its result is still the flow's answer (a dict, status `blocked_data` or
`blocked_model` from training-pipeline, `blocked` from deploy):

- the flow returns `Failed(message="blocked by gates: <reasons>", data=result)`, so its flow run ends
  Failed with that message and the result attached;
- a `GatedFlow` called in process (`sluicegate run`, a parent flow, a test) returns that result as
  before instead of raising, so the CLI keeps its exit code 3 and its message; `return_state=True`
  gives the Failed state itself. Any other failure raises as from any flow.
"""

from __future__ import annotations

from typing import Any

from prefect import Flow
from prefect.client.schemas.objects import State
from prefect.states import Failed

# The training pipeline's statuses when validation or the model gates stopped it, and deploy's.
BLOCKED = ("blocked_data", "blocked_model", "blocked")
MAX_MESSAGE = 2000


def is_blocked(result: Any) -> bool:
    return isinstance(result, dict) and result.get("status") in BLOCKED


def blocked_message(result: dict) -> str:
    reason = result.get("reason") or result["status"]
    if result["status"] == "blocked_data":
        text = f"blocked by gates: validation: {reason}"
    else:
        version = f" (v{result['version']} stays challenger)" if result.get("version") else ""
        text = f"blocked by gates: {reason}{version}"
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def finish(result: dict) -> dict | State:
    """What a flow returns: a blocked result as a Failed state carrying it, anything else as it is."""
    return Failed(message=blocked_message(result), data=result) if is_blocked(result) else result


class GatedFlow(Flow):
    """A flow that may end Failed because a gate blocked it (see the module): called in process it
    returns the blocked result instead of raising."""

    def __call__(self, *args, return_state: bool = False, wait_for=None, **kwargs):
        state = super().__call__(*args, return_state=True, wait_for=wait_for, **kwargs)
        if return_state:
            return state
        if state.is_failed():
            data = state.result(raise_on_failure=False, _sync=True)
            if is_blocked(data):
                return data
        return state.result(_sync=True)


def gated_flow(**options):
    """`@flow(**options)`, as a GatedFlow."""
    def decorate(fn):
        return GatedFlow(fn, **options)
    return decorate
