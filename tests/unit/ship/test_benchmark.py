import numpy as np
import pytest
import torch

from sluicegate.runtime import ModelInput
from sluicegate.ship.benchmark import BenchConfig, benchmark_variant, cost_per_million
from sluicegate.ship.export import export_onnx
from sluicegate.train.config import TrainConfig
from sluicegate.train.models import FraudMLP


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = ModelInput(rng.normal(size=(512, 12)).astype(np.float32), rng.integers(0, 5, (512, 4)))
    path = export_onnx(FraudMLP(12, [5, 5, 5, 5], TrainConfig(hidden=32)).eval(), data,
                       tmp_path_factory.mktemp("b") / "m.onnx")
    return path, data


def test_all_mlperf_scenarios_are_measured(onnx_model):
    path, data = onnx_model
    cfg = BenchConfig(warmup_queries=10, min_queries=200, min_seconds=0.05, server_qps=2000, batch_sizes=(1, 64))
    result = benchmark_variant("fp32", path, data, cfg, "CPUExecutionProvider")
    names = [s.scenario for s in result.scenarios]
    assert names == ["SingleStream", "Server", "Offline", "Batch1", "Batch64"]
    single, server, offline = (result.scenario(n) for n in ("SingleStream", "Server", "Offline"))
    assert single.queries >= cfg.min_queries and server.queries >= cfg.min_queries
    assert single.p50_ms <= single.p90_ms <= single.p99_ms
    assert server.target_qps == 2000 and offline.batch_size == cfg.offline_batch
    assert offline.samples_per_s > single.samples_per_s  # batching amortizes the call overhead
    assert result.model_bytes == path.stat().st_size


def test_cost_per_million():
    # 1,000 predictions/s for an hour at $3.60/h: 3.6M predictions for $3.60.
    assert cost_per_million(1000.0, 3.60) == pytest.approx(1.0)
    assert cost_per_million(0.0, 1.0) == float("inf")
