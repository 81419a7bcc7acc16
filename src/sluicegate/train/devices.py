"""The device and precision layer: which accelerator, which number format, and a record of both.

CUDA and ROCm builds of torch both expose the GPU as `cuda`; `torch.version.hip`
tells them apart. Apple GPUs are `mps`; everything else trains on the CPU.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

import torch

from sluicegate import hardware
from sluicegate.train.config import Precision


def pick_device(preference: str = "auto") -> torch.device:
    """CUDA (ROCm builds report as cuda too), then Apple MPS, then CPU.

    Under torchrun each process takes the GPU named by LOCAL_RANK.
    """
    if preference != "auto":
        return torch.device(preference)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def device_kind(device: torch.device) -> str:
    """cpu, cuda, rocm or mps: what a hardware profile calls the device."""
    if device.type == "cuda" and getattr(torch.version, "hip", None):
        return "rocm"
    return device.type


@dataclass(frozen=True)
class PrecisionPolicy:
    """How a training step computes: the autocast dtype (None = plain fp32) and gradient scaling."""

    name: str  # fp32, bf16 or fp16
    autocast: torch.dtype | None
    grad_scaling: bool

    def autocast_context(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None)


def precision_policy(device: torch.device, requested: Precision = "auto") -> PrecisionPolicy:
    """The precision for a device; an explicit request overrides the default.

    'auto': bf16 on GPUs that have it (same range as fp32, no scaling needed), fp16 with
    gradient scaling on older GPUs, fp32 on CPU (bf16 autocast is slower than fp32 on cores
    without AMX) and on MPS (autocast coverage there is still partial).
    fp16 always gets gradient scaling: its small range underflows gradients otherwise.
    """
    if requested == "auto":
        if device.type != "cuda":
            requested = "fp32"
        else:
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]
    return PrecisionPolicy(name=requested, autocast=dtype, grad_scaling=dtype == torch.float16)


def autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The autocast dtype for a device; None means plain fp32."""
    return precision_policy(device, precision).autocast


def configure_backends(device: torch.device, deterministic: bool = False) -> None:
    """TF32 for fp32 matmuls on Ampere+ GPUs (10-bit mantissa, ample for training), cuDNN autotuning.

    Deterministic runs turn autotuning off and ask torch for deterministic kernels.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


def device_fingerprint(device: torch.device, policy: PrecisionPolicy,
                       compiled: bool = False, world_size: int = 1) -> dict:
    """What a training run executed on, for the MLflow record."""
    import onnxruntime as ort

    from sluicegate import runtime

    info = {
        "device_type": device.type,
        "device_kind": device_kind(device),
        "device_name": platform.processor() or platform.machine(),
        "device_count": 1,
        "world_size": world_size,
        "torch_version": torch.__version__,
        "onnxruntime_version": ort.__version__,
        "onnxruntime_build": runtime.onnxruntime_build(),
        "onnxruntime_providers": ",".join(ort.get_available_providers()),
        "precision": policy.name,
        "autocast_dtype": str(policy.autocast).replace("torch.", "") if policy.autocast else "none",
        "grad_scaling": policy.grad_scaling,
        "compile": compiled,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "host_memory_gb": _host_memory_gb(),
        "python_platform": platform.platform(),
    }
    if device.type == "cpu":
        info["device_name"] = hardware.cpu_model() or info["device_name"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, device_count=torch.cuda.device_count(),
                    device_memory_gb=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}",
                    cuda_version=torch.version.cuda, hip_version=getattr(torch.version, "hip", None),
                    cudnn_version=torch.backends.cudnn.version(), driver_version=hardware.gpu_driver_version())
    if device.type == "mps":
        info["device_name"] = "Apple GPU (MPS)"
    return info


def _host_memory_gb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return round(psutil.virtual_memory().total / 2**30, 1)
