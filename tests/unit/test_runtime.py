"""onnxruntime sessions run on the provider asked for or not at all: onnxruntime's own fallback (a
warning, then the CPU) never measures or serves under another provider's name."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from sluicegate.runtime import (
    ModelInput,
    ProviderUnavailable,
    check_session,
    make_session,
    onnxruntime_build,
    require_provider,
)
from sluicegate.ship.export import export_onnx
from sluicegate.train.config import TrainConfig
from sluicegate.train.models import TabularMLP

AVAILABLE = ort.get_available_providers()


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = ModelInput(rng.normal(size=(16, 3)).astype(np.float32), rng.integers(0, 3, (16, 2)))
    return export_onnx(TabularMLP(3, [3, 3], TrainConfig(hidden=8)).eval(), data,
                       tmp_path_factory.mktemp("rt") / "m.onnx")


@pytest.mark.skipif("MIGraphXExecutionProvider" in AVAILABLE, reason="this onnxruntime has MIGraphX")
def test_a_session_on_a_missing_provider_is_refused_not_run_on_the_cpu(onnx_path):
    # onnxruntime alone would warn and return a CPU session here.
    with pytest.raises(ProviderUnavailable, match="MIGraphXExecutionProvider is not available.*onnxruntime-migraphx"):
        make_session(onnx_path, providers=["MIGraphXExecutionProvider", "CPUExecutionProvider"])


def test_a_session_that_got_another_provider_than_asked_is_refused(onnx_path):
    session = make_session(onnx_path, providers=["CPUExecutionProvider"])
    assert check_session(session, "CPUExecutionProvider") == "CPUExecutionProvider"
    with pytest.raises(ProviderUnavailable, match="asked for CUDAExecutionProvider and started CPUExecutionProvider"):
        check_session(session, "CUDAExecutionProvider")


def test_the_build_is_named_with_its_version():
    assert onnxruntime_build().startswith(("onnxruntime ", "onnxruntime-")) and ort.__version__ in onnxruntime_build()
    require_provider("CPUExecutionProvider")  # every build has it
