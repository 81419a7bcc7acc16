"""Target hardware: the execution provider a target runs on, what an hour of it costs, and what ran.

One setting names the target (SLUICEGATE_TARGET, or the target of SLUICEGATE_HARDWARE_PROFILE): the
pipeline, `deploy` and the model server all resolve it here, and a target whose provider this
onnxruntime lacks is refused here, before any work, never run on the CPU under its name.
"""

from __future__ import annotations

import glob
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sluicegate import runtime
from sluicegate.config import Settings
from sluicegate.runtime import Provider

HARDWARE_PATH = Path(__file__).with_name("hardware.yaml")
DEFAULT_TARGET = "cpu"
NVIDIA_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
AMD_PROVIDERS = ("MIGraphXExecutionProvider",)


@dataclass
class Hardware:
    target: str
    provider: str
    profile: str
    price_per_hour: float
    device: str = ""  # what the provider ran on: the CPU's model, or the GPU's name, memory and driver
    onnxruntime: str = ""  # the onnxruntime build, e.g. "onnxruntime 1.31.1 (CPU build)"
    variant_options: dict[str, dict[str, str]] = field(default_factory=dict)  # provider options per variant

    def providers(self, variant: str) -> list[Provider]:
        """What an onnxruntime session of `variant` is given: the target's provider, with its options."""
        options = self.variant_options.get(variant)
        return [(self.provider, dict(options))] if options else [self.provider]

    def label(self) -> str:
        """One line for reports: the provider, the device and the onnxruntime build."""
        return f"{self.provider} on {self.device or 'an unrecorded device'}, {self.onnxruntime or 'onnxruntime'}"

    def params(self) -> dict[str, str]:
        """The hardware as MLflow params."""
        return {"hardware.target": self.target, "hardware.provider": self.provider, "hardware.profile": self.profile,
                "hardware.price_per_hour": f"{self.price_per_hour:g}", "hardware.device": self.device[:500],
                "hardware.onnxruntime": self.onnxruntime}


def _table() -> dict:
    return yaml.safe_load(HARDWARE_PATH.read_text())


def target_and_profile(target: str | None, profile: str | None, table: dict | None = None) -> tuple[str, str]:
    """The target and the priced profile: either one names the other; given together, they must agree."""
    table = table or _table()
    targets, profiles = table["targets"], table["profiles"]
    if target is not None and target not in targets:
        raise ValueError(f"unknown target {target!r}; choose one of {sorted(targets)} (SLUICEGATE_TARGET)")
    if profile is not None and profile not in profiles:
        raise ValueError(f"unknown hardware profile {profile!r}; choose one of {sorted(profiles)} in {HARDWARE_PATH}")
    if profile is None:
        target = target or DEFAULT_TARGET
        return target, targets[target]["profile"]
    priced = profiles[profile]["target"]
    if target is not None and target != priced:
        same = sorted(name for name, p in profiles.items() if p["target"] == target)
        raise ValueError(f"hardware profile {profile!r} prices a {priced} machine, not target {target!r}: "
                         f"set SLUICEGATE_TARGET={priced}, or a {target} profile ({', '.join(same)})")
    return priced, profile


def hardware(settings: Settings, available: list[str] | None = None) -> Hardware:
    """The settings' target, its provider (ProviderUnavailable if this onnxruntime lacks it), its price
    per hour (overridable) and the device and onnxruntime build it runs on."""
    table = _table()
    target, profile = target_and_profile(settings.target, settings.hardware_profile, table)
    entry = table["targets"][target]
    runtime.require_provider(entry["provider"], available)
    price = settings.price_per_hour or table["profiles"][profile]["price_per_hour"]
    return Hardware(target, entry["provider"], profile, price, device_description(entry["provider"]),
                    runtime.onnxruntime_build(), entry.get("variant_options") or {})


def serving_providers(hw: Hardware, variant: str, override: list[str] | None = None) -> list[Provider]:
    """The model server's providers for a variant: the target's, or an explicit list that starts with it
    (e.g. a fallback the operator chose to allow), every one present."""
    if not override:
        return hw.providers(variant)
    if override[0] != hw.provider:
        raise ValueError(f"SLUICEGATE_SERVE_PROVIDERS starts with {override[0]}, but target {hw.target!r} runs on "
                         f"{hw.provider}: list {hw.provider} first, or change SLUICEGATE_TARGET")
    for name in override:
        runtime.require_provider(name)
    return hw.providers(variant) + list(override[1:])


# --- what the device is -----------------------------------------------------------------------------

def device_description(provider: str) -> str:
    """The device a provider runs on, as a report names it."""
    if provider in NVIDIA_PROVIDERS:
        return nvidia_gpu() or "an NVIDIA GPU (name unread: install nvidia-ml-py)"
    if provider in AMD_PROVIDERS:
        return amd_gpu() or "an AMD GPU (name unread from /sys/class/drm)"
    return cpu_description()


def cpu_description() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model() or platform.processor() or platform.machine()}, {cores} cores"


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def nvidia_gpu() -> str | None:
    """Name, memory, driver and CUDA driver version of GPU 0, from NVML (nvidia-ml-py)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30
        cuda = pynvml.nvmlSystemGetCudaDriverVersion()
    except Exception:  # no NVML: not NVIDIA, or the bindings are not installed
        return None
    name = name.decode() if isinstance(name, bytes) else name
    return (f"{name}, {memory:.0f} GiB, driver {gpu_driver_version() or 'unknown'}, "
            f"CUDA {cuda // 1000}.{cuda % 1000 // 10}")


def amd_gpu() -> str | None:
    """Name and memory of the first amdgpu card, and the driver, from sysfs."""
    for card in sorted(glob.glob("/sys/class/drm/card[0-9]*/device")):
        name, vram = _read(f"{card}/product_name"), _read(f"{card}/mem_info_vram_total")
        if vram is None:  # not an amdgpu card
            continue
        return (f"{name or 'AMD GPU ' + (_read(f'{card}/device') or '')}, {int(vram) / 2**30:.0f} GiB, "
                f"amdgpu {gpu_driver_version() or 'in-kernel driver'}")
    return None


def gpu_driver_version() -> str | None:
    """NVIDIA driver from NVML or procfs; the amdgpu driver from sysfs."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # no NVML: not NVIDIA, or the bindings are not installed
        pass
    for path in ("/proc/driver/nvidia/version", "/sys/module/amdgpu/version"):
        if (line := _read(path)) is not None:
            return line
    return None


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return None
