"""MLflow tracking and the model registry: versions, lineage tags and aliases.

Aliases replace the deprecated stages: `challenger` marks the newest
candidate, `champion` the version being served.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import mlflow.data
import mlflow.onnx
import numpy as np
import onnx
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import LoggedModelInput, Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, DataType, Schema, TensorSpec
from mlflow.types.utils import _infer_pandas_column  # MLflow's type of one column (pinned mlflow)

from sluicegate.config import Settings, file_lock
from sluicegate.runtime import INPUT_NAMES, OUTPUT_NAME, sha256_file

CHAMPION = "champion"
CHALLENGER = "challenger"
ONNX_FILE = "model.onnx"
# Model names become registry keys and folder names (the exported model repository): no separators, no "..".
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# A model version is fetched only from the tracking server's own stores, never from an arbitrary location.
REGISTRY_SCHEMES = ("models:/", "runs:/")
KEY_METRICS = ("pr_auc", "roc_auc", "ece", "recall", "precision", "p99_ms_batch1", "server_p99_ms", "rows_per_s",
               "cost_per_million", "threshold")
DIGEST_CHARS = 36  # the width of MLflow's dataset digest column
# What MLflow answers for a model that is not registered yet and for an alias that is not set.
NOT_FOUND_CODES = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"})
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"


class ArtifactRefused(RuntimeError):
    """A version's artifact that must not load whatever the registry's health: not from the registry,
    no model.onnx in it, or bytes that do not match its sha256 tag. Retrying cannot help."""


def _is(exc: MlflowException, *codes: str) -> bool:
    return exc.error_code in codes


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
        except MlflowException as exc:
            if not _is(exc, ALREADY_EXISTS):  # an outage is not "created meanwhile by a concurrent run"
                raise
    mlflow.set_experiment(settings.experiment)
    return client


# ONNX element types of the tensor contract, as numpy dtypes for MLflow's TensorSpec.
_ONNX_DTYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.INT64: np.int64,
                onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64}


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    dtype = _ONNX_DTYPES.get(tensor.elem_type)
    if dtype is None:
        raise ValueError(f"ONNX {value.name!r}: element type {tensor.elem_type} is not in the tensor contract")
    # A named (symbolic) or unknown dimension is the batch: -1 in MLflow's schema.
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return TensorSpec(np.dtype(dtype), shape, value.name)


def onnx_signature(model: onnx.ModelProto) -> ModelSignature:
    """The model's signature read from its graph: `numeric` float32 [-1, N] and `categorical`
    int64 [-1, M] in, `probability` out, with N and M the widths the graph was exported with."""
    inputs = {v.name: v for v in model.graph.input}
    outputs = {v.name: v for v in model.graph.output}
    missing = [n for n in INPUT_NAMES if n not in inputs] + [n for n in (OUTPUT_NAME,) if n not in outputs]
    if missing:
        raise ValueError(f"ONNX graph lacks {missing}; the contract is {list(INPUT_NAMES)} -> {OUTPUT_NAME!r}")
    return ModelSignature(inputs=Schema([_tensor_spec(inputs[n]) for n in INPUT_NAMES]),
                          outputs=Schema([_tensor_spec(outputs[OUTPUT_NAME])]))


def input_example(signature: ModelSignature, rows: int = 2) -> dict[str, np.ndarray]:
    """A request MLflow stores beside the model and checks it against: zeros (every code 0 = unknown)."""
    return {spec.name: np.zeros((rows, *spec.shape[1:]), dtype=spec.type) for spec in signature.inputs.inputs}


def log_onnx_model(onnx_path: Path, example: dict[str, np.ndarray] | None = None) -> mlflow.models.model.ModelInfo:
    """Log the ONNX file as an MLflow model in the active run, with its signature and an input
    example (CPU provider by default; MLflow's own default would be CUDA first)."""
    model = onnx.load(str(onnx_path))
    signature = onnx_signature(model)
    return mlflow.onnx.log_model(
        model, name="model", save_as_external_data=False, signature=signature,
        input_example=example if example is not None else input_example(signature),
        onnx_execution_providers=["CPUExecutionProvider"],
    )


def log_training_dataset(frame, data_hash: str, context: str = "training", *, name: str | None = None,
                         source: str | None = None, targets: str | None = None,
                         model_id: str | None = None) -> mlflow.data.pandas_dataset.PandasDataset:
    """Record the training set on the active run with mlflow.data, its hash as the digest.

    MLflow keeps at most 36 characters of a digest, so a longer hash (sha256) is cut to that and
    also kept whole in the input's `data_hash` tag. With `model_id`, the logged model links to it.
    """
    dataset = mlflow.data.from_pandas(frame, source=source, targets=targets,
                                      name=name or f"train-{data_hash[:12]}", digest=data_hash[:DIGEST_CHARS])
    dataset.__dict__["schema"] = dataset_schema(frame)  # `schema` is a cached_property: this is what is logged
    mlflow.log_input(dataset, context=context, tags={"data_hash": data_hash},
                     model=LoggedModelInput(model_id) if model_id else None)
    return dataset


def dataset_schema(frame: pd.DataFrame) -> Schema:
    """The schema MLflow infers for a pandas frame, column by column rather than value by value.

    MLflow's own inference visits every value in Python, to find missing ones and a string column's
    type: 111 s for 7M training rows. A value is missing where pandas says so (None, NaN, NA, NaT, as
    MLflow's test), and a pandas string column is MLflow's `string`, whatever its values."""
    return Schema([ColSpec(type=DataType.string if isinstance(frame[c].dtype, pd.StringDtype)
                           else _infer_pandas_column(frame[c]), name=c, required=not frame[c].isna().any())
                   for c in frame.columns])


def register_candidate(client: MlflowClient, name: str, model_info, run_id: str, onnx_path: Path,
                       tags: dict[str, str], metrics: dict[str, float] | None = None) -> ModelVersion:
    """A new version carrying the ONNX it would ship, its hash and lineage; alias challenger.

    Idempotent: a retry after a lost response (the version was created, the answer never came)
    finds the version this run already registered with this sha256 and returns it, so a run never
    leaves two versions. The key metrics are logged against the logged model too (model_id), so
    MLflow's model page shows them; without `metrics`, those the pipeline put on the parent run are used.
    """
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if not _is(exc, ALREADY_EXISTS):
            raise
    sha = sha256_file(onnx_path)
    existing = registered_by_run(client, name, run_id, sha)
    if existing is not None:
        challenger = version_by_alias(client, name, CHALLENGER)
        if challenger is None or int(challenger.version) <= int(existing.version):  # never move it backwards
            client.set_registered_model_alias(name, CHALLENGER, existing.version)
        return existing
    tags = {**tags, "sha256": sha}
    log_model_metrics(client, run_id, model_info.model_id, metrics if metrics is not None else
                      run_key_metrics(client, run_id))
    version = client.create_model_version(name, source=model_info.model_uri, run_id=run_id,
                                          tags={k: str(v) for k, v in tags.items()},
                                          model_id=model_info.model_id)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return version


def registered_by_run(client: MlflowClient, name: str, run_id: str, sha256: str) -> ModelVersion | None:
    """The (oldest) version of `name` that run `run_id` registered with this ONNX hash, if any.

    Matched on the run and the sha256 tag, not the source: a retried register stage logs the
    same ONNX again as a new logged model, so the source differs while the artifact does not.
    """
    found = client.search_model_versions(f"name='{check_model_name(name)}' and run_id='{_quoted(run_id)}'")
    same = [v for v in found if v.run_id == run_id and v.tags.get("sha256") == sha256]
    return min(same, key=lambda v: int(v.version)) if same else None


def _quoted(value: str) -> str:
    if "'" in value or "\\" in value:
        raise ValueError(f"run id {value!r} cannot be used in a registry search")
    return value


def run_key_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    """KEY_METRICS from the pipeline's parent run of `run_id` (where the pipeline logs them), else the run's."""
    run = client.get_run(run_id)
    parent_id = run.data.tags.get("mlflow.parentRunId")
    metrics = client.get_run(parent_id).data.metrics if parent_id else run.data.metrics
    return {k: metrics[k] for k in KEY_METRICS if k in metrics}


def log_model_metrics(client: MlflowClient, run_id: str, model_id: str, metrics: dict[str, float]) -> None:
    """Metrics on the logged model (and its run), as MLflow 3's model page reads them."""
    if not metrics:
        return
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0, model_id=model_id) for k, v in metrics.items()])


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
    """Every promotion and rollback, oldest first; [] only for a model that is not registered.

    A registry that cannot answer raises: read as "no history" it would tell `rollback` there is
    no previous champion and `status --history` that nothing was ever promoted.
    """
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException as exc:
        if _is(exc, "RESOURCE_DOES_NOT_EXIST"):
            return []
        raise
    return [json.loads(v) for k, v in sorted(tags.items()) if k.startswith("audit.")]


def previous_champion(client: MlflowClient, name: str) -> str | None:
    """The version that was champion before the current one."""
    current = version_by_alias(client, name, CHAMPION)
    for event in reversed(history(client, name)):
        if current and event["version"] == str(current.version) and event.get("previous"):
            return str(event["previous"])
    return None


def record_decision(client: MlflowClient, name: str, version: str, decision: dict) -> None:
    """Keep the latest gate decision on the version (tags and its description, which MLflow's
    version page shows first) and on the registered model."""
    summary = json.dumps({"version": version, "promote": decision["promote"],
                          "variant": decision["variant"], "reason": decision["reason"]})
    client.set_model_version_tag(name, version, "gate_decision", "promote" if decision["promote"] else "block")
    client.set_model_version_tag(name, version, "gate_reason", decision["reason"][:4900])
    client.update_model_version(name, version, description=decision_description(decision))
    client.set_registered_model_tag(name, "last_gate_decision", summary[:4900])


def decision_description(decision: dict) -> str:
    """The gate's verdict in a few lines of markdown: what was decided, why, and each gate."""
    verdict = "promoted to @champion" if decision["promote"] else "blocked: stays @challenger"
    lines = [f"**Gate decision: {verdict}** (variant `{decision['variant']}`). {decision['reason']}"]
    gates = decision.get("gates") or []
    if gates:
        lines += ["", "| gate | result | measured | threshold |", "|---|---|---|---|"]
        for g in gates:
            result = "pass" if g.get("passed") else "FAIL"
            lines.append(f"| {g.get('gate')} | {result} | {_cell(g.get('measured'))} | {_cell(g.get('threshold'))} |")
    return "\n".join(lines)[:4900]


def _cell(value) -> str:
    return "n/a" if value is None else f"{value:.6g}" if isinstance(value, int | float) else str(value)


def download_onnx(client: MlflowClient, version: ModelVersion, dst: Path) -> Path:
    """Fetch a version's ONNX file and check it against the hash recorded at registration.

    A version that must never load raises ArtifactRefused (a RuntimeError); a failure to fetch
    it (the registry or artifact store down, a network error, a full disk) raises what the
    download raised (MlflowException, OSError), so a caller can tell the two apart and try again.
    """
    source = str(version.source or "")
    if not source.startswith(REGISTRY_SCHEMES) or ".." in source.split("/"):
        raise ArtifactRefused(f"{version.name} v{version.version}: source {source!r} is not in the registry "
                              f"({' or '.join(REGISTRY_SCHEMES)} URIs only); refusing to load it")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dst)))
    path = local / ONNX_FILE
    if not path.is_file():
        raise ArtifactRefused(f"{version.name} v{version.version}: its artifact {source} has no {ONNX_FILE}; "
                              "refusing to load it")
    expected = version.tags.get("sha256")
    actual = sha256_file(path)
    if expected != actual:
        raise ArtifactRefused(f"{version.name} v{version.version}: artifact sha256 {actual} does not match "
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
    """Champion, challenger and the last gate decision, as one JSON-able object.

    Empty only for a model that is not registered; a registry that cannot answer raises.
    """
    try:
        model = client.get_registered_model(name)
    except MlflowException as exc:
        if not _is(exc, "RESOURCE_DOES_NOT_EXIST"):
            raise
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
