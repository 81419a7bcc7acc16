"""The target: one setting, its provider present or refused before any work, its price and the device
that ran it. Provider availability is onnxruntime's own `get_available_providers()`, never a made-up list."""

from __future__ import annotations

import onnxruntime as ort
import pytest
import yaml

from sluicegate.config import Settings
from sluicegate.hardware import (
    HARDWARE_PATH,
    Hardware,
    cpu_model,
    hardware,
    serving_providers,
    target_and_profile,
)
from sluicegate.runtime import ProviderUnavailable

AVAILABLE = ort.get_available_providers()
TABLE = yaml.safe_load(HARDWARE_PATH.read_text())
GPU_TARGETS = {"cuda": ("CUDAExecutionProvider", "onnxruntime-gpu"),
               "tensorrt": ("TensorrtExecutionProvider", "onnxruntime-gpu"),
               "rocm": ("MIGraphXExecutionProvider", "onnxruntime-migraphx")}


def test_a_cpu_target_names_the_cpu_provider_the_cpus_model_and_the_onnxruntime_build():
    hw = hardware(Settings())
    assert (hw.target, hw.provider, hw.profile) == ("cpu", "CPUExecutionProvider", "cpu-2core")
    if cpu_model():  # /proc/cpuinfo has one on Linux x86
        assert hw.device.startswith(cpu_model())
    assert hw.device.endswith(" cores") and ort.__version__ in hw.onnxruntime and "CPU build" in hw.onnxruntime
    assert hw.params()["hardware.provider"] == "CPUExecutionProvider"
    assert hw.label().startswith("CPUExecutionProvider on ")


@pytest.mark.parametrize("target", sorted(GPU_TARGETS))
def test_a_target_whose_provider_is_missing_is_refused_naming_it_and_what_to_install(target):
    provider, package = GPU_TARGETS[target]
    if provider in AVAILABLE:
        pytest.skip(f"this onnxruntime has {provider}")
    with pytest.raises(ProviderUnavailable) as raised:
        hardware(Settings(target=target))
    assert provider in str(raised.value) and f"pip install {package}" in str(raised.value)


def test_rocm_runs_on_migraphx_the_provider_onnxruntime_still_has():
    assert TABLE["targets"]["rocm"]["provider"] == "MIGraphXExecutionProvider"
    assert "ROCMExecutionProvider" not in HARDWARE_PATH.read_text().replace("ROCMExecutionProvider in 1.23", "")


def test_the_profile_names_the_target_and_the_target_its_profile():
    assert target_and_profile(None, None) == ("cpu", "cpu-2core")
    assert target_and_profile(None, "amd-mi300x") == ("rocm", "amd-mi300x")
    assert target_and_profile("cuda", None) == ("cuda", "nvidia-l4")
    assert target_and_profile("cpu", "cpu-16core") == ("cpu", "cpu-16core")


def test_a_profile_that_prices_another_target_is_refused():
    with pytest.raises(ValueError, match="prices a cpu machine, not target 'rocm'.*amd-mi300x"):
        target_and_profile("rocm", "cpu-2core")
    with pytest.raises(ValueError, match="unknown target 'tpu'"):
        target_and_profile("tpu", None)
    with pytest.raises(ValueError, match="unknown hardware profile"):
        hardware(Settings(hardware_profile="nope"))


def test_every_target_and_profile_agree_in_the_table():
    for name, target in TABLE["targets"].items():
        assert TABLE["profiles"][target["profile"]]["target"] == name, name
        assert set(target.get("variant_options") or {}) <= {"fp32", "fp16", "int8", "int8_qdq"}, name
    for name, profile in TABLE["profiles"].items():
        assert profile["target"] in TABLE["targets"], name


def test_the_price_can_be_overridden_and_comes_with_its_profile():
    assert hardware(Settings(hardware_profile="cpu-16core")).price_per_hour == 0.68
    assert hardware(Settings(price_per_hour=1.5)).price_per_hour == 1.5


def test_variant_options_go_with_the_provider_of_that_variant_only():
    mi300 = Hardware("rocm", "MIGraphXExecutionProvider", "amd-mi300x", 3.5,
                     variant_options=TABLE["targets"]["rocm"]["variant_options"])
    assert mi300.providers("fp16") == [("MIGraphXExecutionProvider", {"migraphx_fp16_enable": "1"})]
    assert mi300.providers("fp32") == ["MIGraphXExecutionProvider"]


def test_the_server_takes_the_targets_provider_or_a_list_that_starts_with_it():
    cpu = hardware(Settings())
    assert serving_providers(cpu, "int8", []) == ["CPUExecutionProvider"]
    assert serving_providers(cpu, "int8", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="starts with CUDAExecutionProvider, but target 'cpu'"):
        serving_providers(cpu, "int8", ["CUDAExecutionProvider", "CPUExecutionProvider"])
