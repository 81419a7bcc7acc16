import numpy as np
import onnx
import pytest
import torch

from sluicegate.benchmark import measure
from sluicegate.export import (
    OPSET,
    check_parity,
    export_onnx,
    golden_batch,
    make_session,
    onnx_predict,
    quantize_int8,
    sha256_file,
)
from sluicegate.inputs import ModelInput, cardinalities
from sluicegate.training import FraudMLP, TrainConfig, predict


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    from sluicegate.spec import load_spec
    spec = load_spec()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = ModelInput(rng.normal(size=(4000, 12)).astype(np.float32),
                      np.stack([rng.integers(0, n, 4000) for n in cardinalities(spec)], axis=1))
    model = FraudMLP(12, cardinalities(spec), TrainConfig(hidden=64)).eval()
    out = tmp_path_factory.mktemp("onnx")
    fp32 = export_onnx(model, data, out / "fp32.onnx")
    int8 = quantize_int8(fp32, out / "int8.onnx")
    return model, data, fp32, int8


def test_export_has_pinned_opset_and_dynamic_batch(model_and_data):
    _, data, fp32, _ = model_and_data
    proto = onnx.load(str(fp32))
    assert {o.domain: o.version for o in proto.opset_import}[""] == OPSET
    session = make_session(fp32)
    for rows in (1, 7, 1000):
        assert onnx_predict(session, data.take(np.arange(rows))).shape == (rows,)


def test_fp32_matches_torch_and_int8_stays_close(model_and_data):
    model, data, fp32, int8 = model_and_data
    golden = golden_batch(data)
    ref = predict(model, golden.numeric, golden.categorical)
    assert check_parity(ref, onnx_predict(make_session(fp32), golden), 1e-4).passed
    int8_parity = check_parity(ref, onnx_predict(make_session(int8), golden), 1e-4)
    assert int8_parity.max_abs_diff < 0.05 and int8.stat().st_size < fp32.stat().st_size


def test_parity_check_catches_a_wrong_graph(model_and_data):
    model, data, fp32, _ = model_and_data
    golden = golden_batch(data)
    ref = predict(model, golden.numeric, golden.categorical)
    assert not check_parity(ref, 1 - ref, 1e-4).passed


def test_golden_batch_is_fixed(model_and_data):
    _, data, _, _ = model_and_data
    a, b = golden_batch(data), golden_batch(data)
    assert np.array_equal(a.numeric, b.numeric)


def test_benchmark_reports_latency_and_throughput(model_and_data):
    _, data, _, int8 = model_and_data
    result = measure(make_session(int8, threads=1), golden_batch(data), single_queries=200, min_seconds=0.1)
    assert 0 < result.p50_ms_batch1 <= result.p99_ms_batch1 and result.rows_per_s > 0


def test_sha256_changes_with_content(tmp_path):
    f = tmp_path / "a"
    f.write_bytes(b"one")
    first = sha256_file(f)
    f.write_bytes(b"two")
    assert sha256_file(f) != first and len(first) == 64
