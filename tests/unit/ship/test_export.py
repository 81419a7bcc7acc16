import numpy as np
import onnx
import pytest
import torch

from sluicegate.features.inputs import ModelInput, cardinalities
from sluicegate.runtime import VARIANT_PROVIDERS, make_session, onnx_predict, runnable_providers, sha256_file
from sluicegate.ship.export import OPSET, calibration_sample, check_parity, export_onnx, golden_batch, quantize_int8
from sluicegate.train.config import TrainConfig
from sluicegate.train.loop import predict
from sluicegate.train.models import TabularMLP, build_model


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    from sluicegate.spec import load_spec
    spec = load_spec()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = ModelInput(rng.normal(size=(4000, 12)).astype(np.float32),
                      np.stack([rng.integers(0, n, 4000) for n in cardinalities(spec)], axis=1))
    model = TabularMLP(12, cardinalities(spec), TrainConfig(hidden=64)).eval()
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


def test_sha256_changes_with_content(tmp_path):
    f = tmp_path / "a"
    f.write_bytes(b"one")
    first = sha256_file(f)
    f.write_bytes(b"two")
    assert sha256_file(f) != first and len(first) == 64


@pytest.fixture(scope="module")
def all_variants(tmp_path_factory):
    """Every shipped variant of both architectures, through the pipeline's export stage."""
    from sluicegate.ship.stages import export_stage
    from sluicegate.spec import load_spec
    from sluicegate.train.stages import Prepared

    spec = load_spec()
    rng = np.random.default_rng(1)
    cards = cardinalities(spec)

    def rows(n):
        return ModelInput(rng.normal(size=(n, 12)).astype(np.float32),
                          np.stack([rng.integers(0, c, n) for c in cards], axis=1))

    train, test = rows(3000), rows(3000)
    prepared = Prepared(splits=None, train=train, valid=test, test=test, y_train=None, y_valid=None, y_test=None)
    policy = type("Policy", (), {"parity_tolerance": 1e-4})()
    out = {}
    for kind in ("mlp", "ft_transformer"):
        torch.manual_seed(0)
        model = build_model(kind, 12, cards, TrainConfig(), train.numeric.mean(0), train.numeric.std(0)).eval()
        out[kind] = (model, test, export_stage(model, prepared, tmp_path_factory.mktemp(kind), policy))
    return out


# Largest |probability difference| against torch each variant may show on the golden batch.
VARIANT_TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "int8": 0.03, "int8_qdq": 0.05}


@pytest.mark.parametrize("kind", ["mlp", "ft_transformer"])
def test_every_variant_is_exported_and_stays_close_to_torch(all_variants, kind):
    model, test, outcome = all_variants[kind]
    assert set(outcome.variants) == {"fp32", "fp16", "int8", "int8_qdq"} and outcome.parity.passed
    golden = golden_batch(test)
    ref = predict(model, golden.numeric, golden.categorical)
    for name, path in outcome.variants.items():
        scores = onnx_predict(make_session(path, providers=["CPUExecutionProvider"]), golden)
        diff = check_parity(ref, scores, VARIANT_TOLERANCE[name])
        assert diff.passed, f"{kind} {name}: {diff.max_abs_diff:.2e}"
        assert outcome.max_abs_diff[name] == pytest.approx(diff.max_abs_diff)
        assert np.corrcoef(ref, scores)[0, 1] > 0.99  # the ranking survives quantization
    assert outcome.variants["int8"].stat().st_size < outcome.variants["fp32"].stat().st_size
    assert outcome.variants["fp16"].stat().st_size < outcome.variants["fp32"].stat().st_size


def test_static_int8_is_qdq_and_fp16_keeps_float_io(all_variants):
    _, _, outcome = all_variants["mlp"]
    ops = {n.op_type for n in onnx.load(str(outcome.variants["int8_qdq"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    fp16 = onnx.load(str(outcome.variants["fp16"]))
    assert [i.type.tensor_type.elem_type for i in fp16.graph.input] == [onnx.TensorProto.FLOAT,
                                                                        onnx.TensorProto.INT64]
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in fp16.graph.initializer)


def test_calibration_sample_comes_from_the_training_rows(model_and_data):
    _, data, _, _ = model_and_data
    sample = calibration_sample(data, rows=100)
    assert len(sample) == 100
    assert {tuple(r) for r in sample.numeric.tolist()} <= {tuple(r) for r in data.numeric.tolist()}


def test_variants_are_marked_for_their_execution_providers(all_variants):
    _, _, outcome = all_variants["mlp"]
    assert outcome.providers["fp16"] == list(VARIANT_PROVIDERS["fp16"])
    assert "CPUExecutionProvider" not in outcome.providers["fp16"]
    assert set(outcome.runnable(["CPUExecutionProvider"])) == {"fp32", "int8", "int8_qdq"}
    assert set(outcome.runnable(["CUDAExecutionProvider", "CPUExecutionProvider"])) == set(outcome.variants)
    assert runnable_providers("int8", ["CUDAExecutionProvider", "CPUExecutionProvider"]) == ["CPUExecutionProvider"]


@pytest.mark.gpu
@pytest.mark.skipif("CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="this onnxruntime has no CUDA execution provider")
def test_fp16_runs_on_the_cuda_provider(all_variants):
    model, test, outcome = all_variants["ft_transformer"]
    golden = golden_batch(test)
    session = make_session(outcome.variants["fp16"], providers=["CUDAExecutionProvider"])
    assert check_parity(predict(model, golden.numeric, golden.categorical), onnx_predict(session, golden),
                        VARIANT_TOLERANCE["fp16"]).passed
