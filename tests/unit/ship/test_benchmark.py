import numpy as np
import pytest
import torch

from sluicegate.runtime import ModelInput
from sluicegate.ship.benchmark import BenchConfig, benchmark_variant, cost_per_million
from sluicegate.ship.export import export_onnx
from sluicegate.train.config import TrainConfig
from sluicegate.train.models import TabularMLP


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = ModelInput(rng.normal(size=(512, 12)).astype(np.float32), rng.integers(0, 5, (512, 4)))
    path = export_onnx(TabularMLP(12, [5, 5, 5, 5], TrainConfig(hidden=32)).eval(), data,
                       tmp_path_factory.mktemp("b") / "m.onnx")
    return path, data


# 600 queries: enough for LoadGen's early stopping at the Server's 99th percentile (about 460).
FAST = BenchConfig(warmup_queries=10, min_queries=600, min_seconds=0.1, server_qps=2000, batch_sizes=(1, 64))


def test_all_mlperf_scenarios_are_measured_by_loadgen(onnx_model):
    path, data = onnx_model
    result = benchmark_variant("fp32", path, data, FAST, "CPUExecutionProvider")
    names = [s.scenario for s in result.scenarios]
    assert names == ["SingleStream", "Server", "Offline", "Batch1", "Batch64"]
    single, server, offline = (result.scenario(n) for n in ("SingleStream", "Server", "Offline"))
    assert single.queries >= FAST.min_queries and server.queries >= FAST.min_queries
    assert single.p50_ms <= single.p90_ms <= single.p99_ms and server.p50_ms <= server.p99_ms
    assert server.target_qps == 2000 and offline.batch_size == FAST.offline_batch
    assert offline.samples_per_s > single.samples_per_s  # batching amortizes the call overhead
    assert result.model_bytes == path.stat().st_size
    # What ran, as the session reports it: the provider, the CPU's model and the onnxruntime build.
    from sluicegate.hardware import cpu_model
    assert result.provider == "CPUExecutionProvider" and {s.provider for s in result.scenarios} == {result.provider}
    assert result.device.startswith(cpu_model() or "") and "onnxruntime" in result.onnxruntime
    # LoadGen's own verdict and its early-stopping estimates, on every MLPerf scenario.
    for s in (single, server, offline):
        assert s.validity in ("VALID", "INVALID") and s.valid == (s.validity == "VALID"), s
        assert s.early_stopping_met is not None
        assert s.seconds >= FAST.min_seconds  # LoadGen ran for at least its minimum duration
    assert single.validity == "VALID", single.invalid_reason
    assert single.early_stopping_p90_ms >= single.p90_ms and single.early_stopping_p99_ms >= single.p90_ms
    assert server.validity == "VALID", server.invalid_reason  # 2000 q/s of an MLP at a 10 ms bound
    # The batch sweep is no MLPerf scenario: no verdict.
    assert result.scenario("Batch64").validity is None and result.scenario("Batch64").to_dict()["validity"] is None


def test_too_few_queries_for_early_stopping_is_invalid_and_says_why(onnx_model):
    from sluicegate.runtime import make_session
    from sluicegate.ship.benchmark import _Sut, run_scenario

    path, data = onnx_model
    sut = _Sut(make_session(path, threads=1, providers=["CPUExecutionProvider"]), data)
    server = run_scenario("fp32", sut, "Server", BenchConfig(min_queries=200, min_seconds=0.05, server_qps=2000))
    assert server.validity == "INVALID" and server.early_stopping_met is False
    assert "more queries" in server.invalid_reason, server.invalid_reason


def test_a_latency_bound_the_model_cannot_meet_is_invalid(onnx_model):
    """The verdict is LoadGen's: a 1 microsecond bound at the 99th percentile cannot hold."""
    from sluicegate.runtime import make_session
    from sluicegate.ship.benchmark import _Sut, run_scenario

    path, data = onnx_model
    sut = _Sut(make_session(path, threads=1, providers=["CPUExecutionProvider"]), data)
    cfg = BenchConfig(min_queries=600, min_seconds=0.1, server_qps=2000, server_latency_ms=0.001)
    server = run_scenario("fp32", sut, "Server", cfg)
    assert server.validity == "INVALID" and not server.valid
    assert server.p99_ms > cfg.server_latency_ms


def test_a_short_run_stays_short(onnx_model):
    """The pipeline benchmarks every variant: LoadGen's scenarios add little beyond their minimum durations."""
    import time

    path, data = onnx_model
    started = time.perf_counter()
    benchmark_variant("fp32", path, data, FAST, "CPUExecutionProvider")
    # SingleStream, Offline and the sweep run ~min_seconds each; Server min_queries / server_qps.
    assert time.perf_counter() - started < 3 * FAST.min_seconds + FAST.min_queries / FAST.server_qps + 5


def test_cost_per_million():
    # 1,000 predictions/s for an hour at $3.60/h: 3.6M predictions for $3.60.
    assert cost_per_million(1000.0, 3.60) == pytest.approx(1.0)
    assert cost_per_million(0.0, 1.0) == float("inf")
