"""The model server and `sluicegate deploy` start without loading training or validation machinery."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "great_expectations", "feast", "dask")


@pytest.mark.parametrize("module", ["sluicegate.serve.app", "sluicegate.flows.deploy", "sluicegate.ship.promote"])
def test_importing_the_server_or_deploy_loads_no_torch_gx_or_feast(module):
    code = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing {module} loaded {out.stdout.strip()}"


def test_the_training_flow_does_load_torch():
    """The check above can fail: the training pipeline's module does import torch."""
    code = "import sys, sluicegate.flows.pipeline; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
