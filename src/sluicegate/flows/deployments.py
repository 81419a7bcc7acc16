"""Register the deployments declared in prefect.yaml whose flow code exists.

prefect.yaml is the one declaration (`prefect deploy --all` reads it too). This
registers through the Python API instead of the CLI for two reasons: it skips
a declared deployment whose entrypoint is not there yet (the CLI stops at the
first one), and `prefect deploy` 3.8.8 ends in a 422 on fastapi 0.154 when it
looks up the pool's workers after creating the first deployment.
Run against a server: PREFECT_API_URL must be set.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]  # src/sluicegate/flows/ -> the checkout
PREFECT_FILE = REPO / "prefect.yaml"


def declared(prefect_file: Path = PREFECT_FILE) -> list[dict]:
    """The deployments as declared in prefect.yaml."""
    return yaml.safe_load(prefect_file.read_text())["deployments"]


def entrypoint_exists(entrypoint: str, root: Path = REPO) -> bool:
    """True when the file exists and defines the function (checked without importing it)."""
    path, _, func = entrypoint.partition(":")
    file = root / path
    if not file.exists():
        return False
    tree = ast.parse(file.read_text())
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
    imported = {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    return func in defined | imported


def ensure_pool(name: str, pool_type: str = "process") -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
            except ObjectAlreadyExists:
                pass  # created meanwhile


def _schedules(spec: dict) -> list:
    from prefect.schedules import Cron

    return [Cron(s["cron"], timezone=s.get("timezone", "UTC"), active=s.get("active", True))
            for s in spec.get("schedules") or []]


@dataclass(frozen=True)
class PoolOverride:
    """Send every deployment to another pool, e.g. the Kubernetes one (see infra/README.md)."""

    name: str
    type: str = "kubernetes"
    image: str = "sluicegate:cpu"
    path: str = "/opt/sluicegate"  # the image's working directory


def register_one(spec: dict, root: Path, override: PoolOverride | None = None) -> str:
    """Create or update one deployment; returns its id."""
    from prefect.deployments.runner import RunnerDeployment

    pool = spec["work_pool"]
    pool_name, job_variables, path = pool["name"], pool.get("job_variables") or {}, str(root)
    if override is not None:
        pool_name, job_variables, path = override.name, {**job_variables, "image": override.image}, override.path
    ensure_pool(pool_name, override.type if override else "process")
    deployment = RunnerDeployment.from_entrypoint(
        spec["entrypoint"], name=spec["name"], schedules=_schedules(spec), description=spec.get("description"),
        tags=spec.get("tags"), parameters=spec.get("parameters") or {}, work_pool_name=pool_name,
        work_queue_name=pool.get("work_queue_name"), job_variables=job_variables,
        enforce_parameter_schema=True)  # a bad value in the UI form is refused before any work
    deployment._path = path  # where the worker runs the flow: this checkout, or the image's copy
    return str(deployment.apply())


def register(prefect_file: Path = PREFECT_FILE, override: PoolOverride | None = None) -> tuple[list[str], list[str]]:
    """Deploy what exists; returns (registered, skipped) deployment names."""
    root = prefect_file.parent
    sys.path.insert(0, str(root))  # entrypoints import `flows.*` and `sluicegate.*`
    os.chdir(root)  # entrypoints are relative to the repository root
    ready, skipped = [], []
    for spec in declared(prefect_file):
        if entrypoint_exists(spec["entrypoint"], root):
            register_one(spec, root, override)
            ready.append(spec["name"])
        else:
            skipped.append(spec["name"])
    return ready, skipped


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sluicegate.flows.deployments")
    parser.add_argument("command", choices=["register"])
    parser.add_argument("--pool", help="register on this work pool instead (created if missing)")
    parser.add_argument("--pool-type", default="kubernetes", help="type of --pool when it is created")
    parser.add_argument("--image", default="sluicegate:cpu", help="image the --pool runs flows in")
    args = parser.parse_args()
    override = PoolOverride(args.pool, args.pool_type, args.image) if args.pool else None
    ready, skipped = register(override=override)
    print(f"registered deployments: {', '.join(ready) or 'none'}")
    if skipped:
        print(f"declared but not registered (flow code not present yet): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
