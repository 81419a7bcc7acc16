"""The ONNX tensor contract and the onnxruntime helpers every phase after training uses.

Kept apart from `ship.export` (which needs torch) so the model server, the registry and
the monitor load onnxruntime alone.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

INPUT_NAMES = ("numeric", "categorical")
OUTPUT_NAME = "probability"
GPU_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "TensorrtExecutionProvider")
CPU_PROVIDERS = ("CPUExecutionProvider",)
# Where each exported variant is meant to run (see ship.export for why).
VARIANT_PROVIDERS: dict[str, tuple[str, ...]] = {
    "fp32": CPU_PROVIDERS + GPU_PROVIDERS,
    "fp16": GPU_PROVIDERS,
    "int8": CPU_PROVIDERS,
    "int8_qdq": CPU_PROVIDERS + ("TensorrtExecutionProvider",),
}


@dataclass
class ModelInput:
    numeric: np.ndarray  # float32 [N, number of numeric inputs]
    categorical: np.ndarray  # int64 [N, number of categorical features], 0 = unknown

    def __len__(self) -> int:
        return len(self.numeric)

    def take(self, index: np.ndarray) -> ModelInput:
        return ModelInput(self.numeric[index], self.categorical[index])


def available_providers() -> list[str]:
    """Execution providers in preference order, limited to what this onnxruntime has."""
    preferred = ["CUDAExecutionProvider", "ROCMExecutionProvider", "CPUExecutionProvider"]
    have = set(ort.get_available_providers())
    return [p for p in preferred if p in have]


def runnable_providers(variant: str, providers: list[str] | None = None) -> list[str]:
    """The present execution providers a variant is meant for, in preference order."""
    present = providers if providers is not None else available_providers()
    return [p for p in present if p in VARIANT_PROVIDERS.get(variant, CPU_PROVIDERS + GPU_PROVIDERS)]


def make_session(path: Path, threads: int = 0, providers: list[str] | None = None) -> ort.InferenceSession:
    """An onnxruntime session with full graph optimization.

    threads=0 lets onnxruntime use every core; benchmarks set it explicitly.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=providers or available_providers())


def onnx_predict(session: ort.InferenceSession, data: ModelInput, batch_size: int = 65536) -> np.ndarray:
    out = [session.run([OUTPUT_NAME], {INPUT_NAMES[0]: data.numeric[i:i + batch_size],
                                       INPUT_NAMES[1]: data.categorical[i:i + batch_size]})[0]
           for i in range(0, len(data), batch_size)]
    return np.concatenate(out).reshape(-1)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
