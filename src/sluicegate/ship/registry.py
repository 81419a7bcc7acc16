"""MLflow tracking and the model registry: versions, lineage tags and aliases.

Aliases replace the deprecated stages: `challenger` marks the newest
candidate, `champion` the version being served.
"""

from __future__ import annotations

import json
import re
import subprocess
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import mlflow.onnx
import onnx
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from sluicegate.config import Settings, file_lock
from sluicegate.runtime import sha256_file

CHAMPION = "champion"
CHALLENGER = "challenger"
ONNX_FILE = "model.onnx"
# Model names become registry keys and folder names (the exported model repository): no separators, no "..".
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# A model version is fetched only from the tracking server's own stores, never from an arbitrary location.
REGISTRY_SCHEMES = ("models:/", "runs:/")
KEY_METRICS = ("pr_auc", "roc_auc", "ece", "recall", "precision", "p99_ms_batch1", "server_p99_ms", "rows_per_s",
               "cost_per_million", "threshold")


def check_model_name(name: str) -> str:
    """The name, if it is safe as a registry key and a folder name; else ValueError."""
    if not MODEL_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"model name {name!r} is not allowed: use letters, digits, '_', '-' and '.', "
                         "starting with a letter or digit, no '..', at most 128 characters")
    return name


def configure(settings: Settings) -> MlflowClient:
    """Point MLflow at the configured store and make sure the experiment exists."""
    check_model_name(settings.model_name)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    client = MlflowClient(settings.tracking_uri, settings.tracking_uri)
    if client.get_experiment_by_name(settings.experiment) is None:
        location = None
        if settings.mlflow_tracking_uri is None:  # embedded store: artifacts under SLUICEGATE_HOME
            location = settings.paths.mlflow_artifacts.as_uri()
        try:
            client.create_experiment(settings.experiment, artifact_location=location)
        except MlflowException:
            pass  # created meanwhile by a concurrent run
    mlflow.set_experiment(settings.experiment)
    return client


def log_onnx_model(onnx_path: Path) -> mlflow.models.model.ModelInfo:
    """Log the ONNX file as an MLflow model in the active run (CPU provider by default)."""
    return mlflow.onnx.log_model(
        onnx.load(str(onnx_path)), name="model", save_as_external_data=False,
        onnx_execution_providers=["CPUExecutionProvider"],
    )


def register_candidate(client: MlflowClient, name: str, model_info, run_id: str, onnx_path: Path,
                       tags: dict[str, str]) -> ModelVersion:
    """A new version carrying the ONNX it would ship, its hash and lineage; alias challenger."""
    try:
        client.create_registered_model(name)
    except MlflowException:
        pass  # already registered
    tags = {**tags, "sha256": sha256_file(onnx_path)}
    version = client.create_model_version(name, source=model_info.model_uri, run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()},
                                          model_id=model_info.model_id)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


# What MLflow answers for a model that is not registered yet and for an alias that is not set.
NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version `alias` points to; None when the model or the alias does not exist.

    A registry that cannot answer (down, timing out) raises: read as "no champion" it would
    let the next candidate be promoted without a comparison, or hide the outage from a server.
    """
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in NOT_FOUND_CODES:
            return None
        raise


class LostRace(RuntimeError):
    """Another promotion moved champion between our decision and our write."""


@contextmanager
def promotion_lock(lock_dir: Path):
    """Serialize champion moves on this machine (a file lock under SLUICEGATE_HOME)."""
    with file_lock(lock_dir / "promotion.lock"):
        yield


def move_champion(client: MlflowClient, name: str, version: str, expected: str | None, event: dict,
                  lock_dir: Path) -> str | None:
    """Compare-and-set the champion alias and record the move; returns the previous champion.

    `expected` is the champion the decision was made against: if another deploy
    moved it meanwhile, this one lost and changes nothing.
    """
    with promotion_lock(lock_dir):
        current = version_by_alias(client, name, CHAMPION)
        current_version = str(current.version) if current else None
        if str(current_version) != str(expected):
            raise LostRace(f"champion moved from v{expected} to v{current_version} while this deploy ran; "
                           "nothing was changed")
        client.set_registered_model_alias(name, CHAMPION, version)
        record = {**event, "version": str(version), "previous": current_version,
                  "at": datetime.now(UTC).isoformat()}
        client.set_registered_model_tag(name, f"audit.{datetime.now(UTC):%Y%m%dT%H%M%S%f}", json.dumps(record))
        client.set_model_version_tag(name, version, f"{event['event']}_at", record["at"])
        return current_version


def history(client: MlflowClient, name: str) -> list[dict]:
    """Every promotion and rollback, oldest first."""
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException:
        return []
    return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith("audit.")]


def previous_champion(client: MlflowClient, name: str) -> str | None:
    """The version that was champion before the current one."""
    current = version_by_alias(client, name, CHAMPION)
    for event in reversed(history(client, name)):
        if current and event["version"] == str(current.version) and event.get("previous"):
            return str(event["previous"])
    return None


def record_decision(client: MlflowClient, name: str, version: str, decision: dict) -> None:
    """Keep the latest gate decision on the version and on the registered model."""
    summary = json.dumps({"version": version, "promote": decision["promote"],
                          "variant": decision["variant"], "reason": decision["reason"]})
    client.set_model_version_tag(name, version, "gate_decision", "promote" if decision["promote"] else "block")
    client.set_model_version_tag(name, version, "gate_reason", decision["reason"][:4900])
    client.set_registered_model_tag(name, "last_gate_decision", summary[:4900])


def download_onnx(client: MlflowClient, version: ModelVersion, dst: Path) -> Path:
    """Fetch a version's ONNX file and check it against the hash recorded at registration."""
    source = str(version.source or "")
    if not source.startswith(REGISTRY_SCHEMES) or ".." in source.split("/"):
        raise RuntimeError(f"{version.name} v{version.version}: source {source!r} is not in the registry "
                           f"({' or '.join(REGISTRY_SCHEMES)} URIs only); refusing to load it")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dst)))
    path = local / ONNX_FILE
    expected = version.tags.get("sha256")
    actual = sha256_file(path)
    if expected != actual:
        raise RuntimeError(f"{version.name} v{version.version}: artifact sha256 {actual} does not match "
                           f"the registered {expected}; refusing to load it")
    return path


def describe_version(client: MlflowClient, version: ModelVersion | None) -> dict | None:
    if version is None:
        return None
    run = client.get_run(version.run_id) if version.run_id else None
    parent_id = run.data.tags.get("mlflow.parentRunId") if run else None
    # Key metrics live on the pipeline's parent run; the version points at its register stage.
    metrics = client.get_run(parent_id).data.metrics if parent_id else (run.data.metrics if run else {})
    return {
        "version": version.version,
        "variant": version.tags.get("variant"),
        "sha256": version.tags.get("sha256"),
        "gate_decision": version.tags.get("gate_decision"),
        "data_hash": version.tags.get("data_hash"),
        "run_id": version.run_id,
        "threshold": float(version.tags["threshold"]) if "threshold" in version.tags else None,
        "metrics": {k: metrics[k] for k in KEY_METRICS if k in metrics},
    }


def status(client: MlflowClient, name: str) -> dict:
    """Champion, challenger and the last gate decision, as one JSON-able object."""
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return {"model": name, "champion": None, "challenger": None, "last_gate_decision": None}
    last = model.tags.get("last_gate_decision")
    return {
        "model": name,
        "champion": describe_version(client, version_by_alias(client, name, CHAMPION)),
        "challenger": describe_version(client, version_by_alias(client, name, CHALLENGER)),
        "last_gate_decision": json.loads(last) if last else None,
    }


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def stage_run(parent_run_id: str, name: str):
    """A nested MLflow run for one stage under the pipeline's parent run.

    The parent is resumed by id, so stages may run in any thread.
    """
    active = mlflow.active_run()
    if active is not None and active.info.run_id == parent_run_id:
        with mlflow.start_run(run_name=name, nested=True) as run:
            yield run
        return
    with mlflow.start_run(run_id=parent_run_id), mlflow.start_run(run_name=name, nested=True) as run:
        yield run
