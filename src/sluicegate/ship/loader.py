"""Load a registered version exactly as the model server does: fetched by its sha256, only the
ONNX bytes handed to onnxruntime, the tensor contract checked, a warm-up batch run.

Nothing from the artifact is unpickled or imported (no pyfunc loader). The `server_load` gate
calls this before promotion; `serve.model` calls it on every champion it swaps in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from sluicegate.config import Settings
from sluicegate.runtime import INPUT_NAMES, OUTPUT_NAME, available_providers
from sluicegate.ship import registry
from sluicegate.spec import DatasetSpec, SpecError, parse_spec

log = logging.getLogger("sluicegate.serve")

# The tensor contract every served model must meet: name -> onnx type; widths come from the spec.
CONTRACT = {INPUT_NAMES[0]: "tensor(float)", INPUT_NAMES[1]: "tensor(int64)"}
WARMUP_ROWS = 8


class ModelRejected(RuntimeError):
    """A version that must not serve: bad hash, not ONNX, wrong contract, failed warm-up."""


class FetchFailed(RuntimeError):
    """The version's artifact could not be fetched (registry, artifact store or network down, a full
    disk): nothing is known against the model, so a caller tries it again rather than refusing it."""


@dataclass
class LoadedModel:
    name: str
    version: str
    session: ort.InferenceSession
    threshold: float
    sha256: str
    variant: str
    onnx_bytes: bytes = field(repr=False)
    spec: DatasetSpec | None = field(default=None, repr=False)  # the spec whose inputs it reads (`fetch_spec`)

    def run(self, numeric: np.ndarray, categorical: np.ndarray) -> np.ndarray:
        out = self.session.run([OUTPUT_NAME], {INPUT_NAMES[0]: numeric, INPUT_NAMES[1]: categorical})[0]
        return out.reshape(-1)


def session_options(threads: int) -> ort.SessionOptions:
    """Full graph optimization; a fixed, small thread count so requests do not fight over cores."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads burn the core the event loop needs between tiny batches.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def choose_providers(wanted: list[str]) -> list[str]:
    """The wanted providers this onnxruntime has, else the best available."""
    have = set(ort.get_available_providers())
    chosen = [p for p in wanted if p in have]
    return chosen or available_providers()


def load_from_bytes(name: str, version: str, data: bytes, expected_sha: str | None, threshold: str | None,
                    variant: str, threads: int, providers: list[str], widths: tuple[int, int]) -> LoadedModel:
    """Check the hash, build the session, check the contract and run a warm-up batch."""
    actual = hashlib.sha256(data).hexdigest()
    if not expected_sha or actual != expected_sha:
        raise ModelRejected(f"{name} v{version}: artifact sha256 {actual} does not match the registered "
                            f"{expected_sha}; refusing to load it")
    try:
        value = float(threshold) if threshold is not None else float("nan")
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise ModelRejected(f"{name} v{version}: tag 'threshold' is {threshold!r}, need a number in (0, 1)")
    try:
        session = ort.InferenceSession(data, session_options(threads), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
        raise ModelRejected(f"{name} v{version}: not a loadable ONNX model: {exc}") from exc
    model = LoadedModel(name, version, session, value, actual, variant, data)
    check_contract(model, widths)
    warm_up(model, widths)
    return model


def check_contract(model: LoadedModel, widths: tuple[int, int]) -> None:
    inputs = {i.name: i for i in model.session.get_inputs()}
    outputs = [o.name for o in model.session.get_outputs()]
    if set(inputs) != set(CONTRACT) or OUTPUT_NAME not in outputs:
        raise ModelRejected(f"{model.name} v{model.version}: inputs {sorted(inputs)} and outputs {outputs}; "
                            f"need inputs {sorted(CONTRACT)} and output {OUTPUT_NAME!r}")
    for (name, onnx_type), width in zip(CONTRACT.items(), widths, strict=True):
        got = inputs[name]
        if got.type != onnx_type or (isinstance(got.shape[1], int) and got.shape[1] != width):
            raise ModelRejected(f"{model.name} v{model.version}: input {name!r} is {got.type} {got.shape}, "
                                f"need {onnx_type} [N, {width}]")


def warm_up(model: LoadedModel, widths: tuple[int, int]) -> None:
    """One real batch through the graph: the first run also pays onnxruntime's lazy setup."""
    numeric = np.zeros((WARMUP_ROWS, widths[0]), dtype=np.float32)
    categorical = np.ones((WARMUP_ROWS, widths[1]), dtype=np.int64)
    try:
        out = model.run(numeric, categorical)
    except Exception as exc:
        raise ModelRejected(f"{model.name} v{model.version}: warm-up run failed: {exc}") from exc
    if out.shape != (WARMUP_ROWS,) or out.dtype != np.float32 or not np.all((out >= 0) & (out <= 1)):
        raise ModelRejected(f"{model.name} v{model.version}: warm-up gave shape {out.shape} {out.dtype}, "
                            f"range [{np.nanmin(out):.3g}, {np.nanmax(out):.3g}]; need probabilities [N]")


def registry_client(settings: Settings) -> MlflowClient:
    """A read-only view of the registry (no experiment is created)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in server logs
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.tracking_uri)
    return MlflowClient(settings.tracking_uri, settings.tracking_uri)


def fetch_onnx(client: MlflowClient, version: ModelVersion) -> bytes:
    """The version's ONNX bytes; registry.download_onnx checks them against the sha256 tag.

    ModelRejected when the artifact itself is refused (not from the registry, no model.onnx, a hash
    mismatch); FetchFailed when it could not be fetched (MLflow, the artifact store, the network or
    the local disk failed), which says nothing against the model.
    """
    try:
        with tempfile.TemporaryDirectory(prefix="sluicegate-serve-") as tmp:
            path = registry.download_onnx(client, version, Path(tmp))
            return path.read_bytes()
    except registry.ArtifactRefused as exc:
        raise ModelRejected(str(exc)) from exc
    except (OSError, mlflow.exceptions.MlflowException) as exc:  # requests' errors are OSErrors too
        raise FetchFailed(f"{version.name} v{version.version}: cannot fetch the artifact: "
                          f"{type(exc).__name__}: {exc}") from exc


def fetch_spec(client: MlflowClient, version: ModelVersion) -> DatasetSpec:
    """The spec whose inputs the version reads, as its evaluation recorded it (`dataset.spec` in
    `evidence/evidence.json`): a champion trained on another spec than the server's is served with its own.

    FetchFailed when the evidence could not be fetched; ModelRejected when it records no usable spec.
    """
    where = f"{version.name} v{version.version}"
    try:
        with tempfile.TemporaryDirectory(prefix="sluicegate-serve-") as tmp:
            local = client.download_artifacts(version.run_id, "evidence/evidence.json", tmp)
            raw = json.loads(Path(local).read_text())
    except (OSError, mlflow.exceptions.MlflowException) as exc:
        raise FetchFailed(f"{where}: cannot fetch its evidence (for its spec): {type(exc).__name__}: {exc}") from exc
    except ValueError as exc:
        raise ModelRejected(f"{where}: its evidence/evidence.json is not JSON: {exc}") from exc
    kept = (raw.get("dataset") or {}).get("spec") if isinstance(raw, dict) else None
    if not kept:
        raise ModelRejected(f"{where}: its evidence records no spec (dataset.spec), and it reads other inputs "
                            "than the server's spec: cannot build its inputs")
    try:
        return parse_spec(kept, Path(f"{where}: evidence dataset.spec"))
    except SpecError as exc:
        raise ModelRejected(f"{where}: its recorded spec is not valid here: {exc}") from exc
