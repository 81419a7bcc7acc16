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
# AMD GPUs run through MIGraphX: onnxruntime removed its ROCm provider in 1.23.
GPU_PROVIDERS = ("CUDAExecutionProvider", "MIGraphXExecutionProvider", "TensorrtExecutionProvider")
CPU_PROVIDERS = ("CPUExecutionProvider",)
# Where each exported variant is meant to run (see ship.export for why). fp16 only where the provider
# has fp16 kernels: the CPU provider lacks most of them and casts around each op, slower than fp32.
VARIANT_PROVIDERS: dict[str, tuple[str, ...]] = {
    "fp32": CPU_PROVIDERS + GPU_PROVIDERS,
    "fp16": GPU_PROVIDERS,
    "int8": CPU_PROVIDERS,
    "int8_qdq": CPU_PROVIDERS + ("TensorrtExecutionProvider", "MIGraphXExecutionProvider"),
}
# The onnxruntime build that carries each provider: one build per machine, they replace each other.
PROVIDER_PACKAGES = {
    "CPUExecutionProvider": "onnxruntime",
    "CUDAExecutionProvider": "onnxruntime-gpu (with CUDA 12 and cuDNN 9 on the machine)",
    "TensorrtExecutionProvider": "onnxruntime-gpu plus TensorRT 10 (pip install tensorrt)",
    "MIGraphXExecutionProvider": "onnxruntime-migraphx (with ROCm and MIGraphX on the machine)",
}
ONNXRUNTIME_BUILDS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-migraphx", "onnxruntime-rocm")
# A provider entry as onnxruntime takes it: a name, or a name and its options.
Provider = str | tuple[str, dict[str, str]]


class ProviderUnavailable(RuntimeError):
    """The execution provider a target needs is not in this onnxruntime, or a session did not get it.

    onnxruntime itself only warns and runs on the CPU; figures measured that way would carry the wrong
    label, so nothing here falls back."""


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
    preferred = ["CUDAExecutionProvider", "MIGraphXExecutionProvider", "CPUExecutionProvider"]
    have = set(ort.get_available_providers())
    return [p for p in preferred if p in have]


def onnxruntime_build() -> str:
    """Which onnxruntime distribution is installed, its version and device: the build that ran."""
    from importlib import metadata

    names = []
    for name in ONNXRUNTIME_BUILDS:
        try:
            names.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return f"{', '.join(names) or 'onnxruntime ' + ort.__version__} ({ort.get_device()} build)"


def require_provider(provider: str, available: list[str] | None = None) -> None:
    """Raise ProviderUnavailable, naming the build to install, unless this onnxruntime has `provider`."""
    have = available if available is not None else ort.get_available_providers()
    if provider in have:
        return
    package = PROVIDER_PACKAGES.get(provider, "an onnxruntime build that carries it")
    raise ProviderUnavailable(
        f"{provider} is not available in this onnxruntime ({onnxruntime_build()}; it has {', '.join(have)}). "
        f"Install {package} in place of the CPU build: pip uninstall -y onnxruntime && pip install "
        f"{package.split(' ')[0]}; or choose another target (SLUICEGATE_TARGET).")


def provider_name(entry: Provider) -> str:
    return entry if isinstance(entry, str) else entry[0]


def check_session(session: ort.InferenceSession, provider: str) -> str:
    """The provider the session runs on; ProviderUnavailable unless it is `provider`.

    onnxruntime drops a provider that fails to start (a missing CUDA library, no device) with a
    warning and runs on the CPU: get_providers() says what it really got."""
    got = session.get_providers()[0]
    if got != provider:
        raise ProviderUnavailable(f"onnxruntime was asked for {provider} and started {got} instead "
                                  f"(its warning above says why); refusing to run or measure on {got}")
    return got


def runnable_providers(variant: str, providers: list[str] | None = None) -> list[str]:
    """The present execution providers a variant is meant for, in preference order."""
    present = providers if providers is not None else available_providers()
    return [p for p in present if p in VARIANT_PROVIDERS.get(variant, CPU_PROVIDERS + GPU_PROVIDERS)]


def make_session(path: Path, threads: int = 0, providers: list[Provider] | None = None) -> ort.InferenceSession:
    """An onnxruntime session with full graph optimization, on the first of `providers` or not at all.

    threads=0 lets onnxruntime use every core; benchmarks set it explicitly.
    """
    providers = providers or available_providers()
    require_provider(provider_name(providers[0]))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=providers)
    check_session(session, provider_name(providers[0]))
    return session


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
