import os
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from sluicegate.runtime import ModelInput
from sluicegate.train.config import TrainConfig
from sluicegate.train.devices import PrecisionPolicy, autocast_dtype, device_kind, pick_device, precision_policy
from sluicegate.train.loop import checkpoint_dir_for, predict, train_model


def synthetic(n, rng):
    numeric = rng.normal(size=(n, 12)).astype(np.float32)
    categorical = np.stack([rng.integers(0, 5, n), rng.integers(0, 3, n)], axis=1)
    logit = 2.5 * numeric[:, 0] - 2 * numeric[:, 1] + (categorical[:, 0] == 3) * 2 - 4
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return ModelInput(numeric, categorical), y


def split(seed, n_train, n_valid):
    """((train, y), (valid, y_valid)) drawn from one seeded generator."""
    rng = np.random.default_rng(seed)
    return synthetic(n_train, rng), synthetic(n_valid, rng)


def test_cpu_training_learns_and_keeps_best_checkpoint(tmp_path):
    (train, y), (valid, yv) = split(0, 20_000, 5_000)
    seen = []
    result = train_model(train, y, valid, yv, [5, 3], TrainConfig(max_epochs=6, batch_size=1024, device="cpu"),
                         tmp_path, on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == list(range(1, result.epochs_run + 1))
    assert result.best_valid_pr_auc == max(r["valid_pr_auc"] for r in seen)
    assert roc_auc_score(yv, predict(result.model, valid.numeric, valid.categorical)) > 0.85
    assert (tmp_path / "best.pt").exists() and result.device["device_type"] == "cpu"


def test_training_is_seeded(tmp_path):
    (train, y), (valid, yv) = split(1, 5_000, 1_000)
    cfg = TrainConfig(max_epochs=2, device="cpu", seed=3)
    a = train_model(train, y, valid, yv, [5, 3], cfg, tmp_path / "a")
    b = train_model(train, y, valid, yv, [5, 3], cfg, tmp_path / "b")
    assert np.allclose(predict(a.model, valid.numeric, valid.categorical),
                       predict(b.model, valid.numeric, valid.categorical))


def test_device_and_precision_policy_on_cpu():
    assert autocast_dtype(torch.device("cpu"), "auto") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    if not torch.cuda.is_available():
        assert pick_device().type in ("cpu", "mps")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA or ROCm device on this machine")
def test_gpu_picks_cuda_and_bf16():
    assert pick_device().type == "cuda"
    assert autocast_dtype(torch.device("cuda"), "auto") in (torch.bfloat16, None)


def test_bf16_autocast_path_trains_on_cpu(tmp_path):
    (train, y), (valid, yv) = split(4, 4_000, 1_000)
    cfg = TrainConfig(max_epochs=3, batch_size=256, device="cpu", precision="bf16")
    result = train_model(train, y, valid, yv, [5, 3], cfg, tmp_path)
    assert result.device["precision"] == "bf16" and result.device["autocast_dtype"] == "bfloat16"
    assert all(np.isfinite(r["train_loss"]) for r in result.history)
    assert roc_auc_score(yv, predict(result.model, valid.numeric, valid.categorical)) > 0.8


def test_precision_policy_scales_gradients_only_for_fp16():
    cpu = torch.device("cpu")
    assert precision_policy(cpu, "auto") == PrecisionPolicy("fp32", None, False)
    assert precision_policy(cpu, "fp16").grad_scaling and precision_policy(cpu, "fp16").autocast == torch.float16
    assert not precision_policy(cpu, "bf16").grad_scaling
    assert device_kind(cpu) == "cpu"


def test_fingerprint_records_versions_precision_compile_and_determinism(tmp_path):
    (train, y), (valid, yv) = split(5, 2_000, 500)
    cfg = TrainConfig(max_epochs=1, device="cpu", deterministic=True)
    try:
        fp = train_model(train, y, valid, yv, [5, 3], cfg, tmp_path).device
    finally:
        torch.use_deterministic_algorithms(False)
    import onnxruntime

    assert fp["device_kind"] == "cpu" and fp["device_count"] == 1 and fp["world_size"] == 1
    assert fp["torch_version"] == torch.__version__ and fp["onnxruntime_version"] == onnxruntime.__version__
    assert fp["precision"] == "fp32" and fp["compile"] is False and fp["deterministic_algorithms"] is True
    assert fp["device_name"] and fp["cpu_threads"] >= 1


def test_checkpoint_dir_is_keyed_on_data_config_and_model_spec(tmp_path):
    cfg = TrainConfig()
    here = checkpoint_dir_for(tmp_path, "abc", cfg, "s1")
    assert here == checkpoint_dir_for(tmp_path, "abc", TrainConfig(), "s1")
    assert here != checkpoint_dir_for(tmp_path, "abd", cfg, "s1")
    assert here != checkpoint_dir_for(tmp_path, "abc", TrainConfig(seed=1), "s1")
    # another spec on the same data and config: a sibling folder, so a run can say what changed
    assert checkpoint_dir_for(tmp_path, "abc", cfg, "s2") == here.parent / "s2"


def test_last_checkpoint_holds_everything_a_resume_needs(tmp_path):
    (train, y), (valid, yv) = split(6, 2_000, 500)
    cfg = TrainConfig(max_epochs=2, patience=5, device="cpu")
    first = train_model(train, y, valid, yv, [5, 3], cfg, tmp_path)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    assert {"model", "optimizer", "scaler", "progress", "rng_torch", "rng_numpy"} <= set(state)
    assert state["progress"]["epoch"] == 2 and state["progress"]["done"]
    # A finished run started again does not train again; it returns the same best weights.
    again = train_model(train, y, valid, yv, [5, 3], cfg, tmp_path)
    assert again.resumed_from_epoch == 2 and again.history == first.history
    assert np.array_equal(predict(again.model, valid.numeric, valid.categorical),
                          predict(first.model, valid.numeric, valid.categorical))


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on CPU needs a C compiler")
@pytest.mark.skipif(os.environ.get("SLUICEGATE_SLOW_TESTS") != "1",
                    reason="torch.compile takes about a minute on 2 CPU cores; set SLUICEGATE_SLOW_TESTS=1")
def test_compiled_training_step_trains_on_cpu(tmp_path):
    (train, y), (valid, yv) = split(7, 4_000, 1_000)
    result = train_model(train, y, valid, yv, [5, 3],
                         TrainConfig(max_epochs=2, batch_size=1000, device="cpu", compile=True), tmp_path)
    assert result.device["compile"] is True
    assert roc_auc_score(yv, predict(result.model, valid.numeric, valid.categorical)) > 0.8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA or ROCm device on this machine")
def test_gpu_training_records_the_gpu(tmp_path):
    (train, y), (valid, yv) = split(8, 20_000, 5_000)
    for model in ("mlp", "ft_transformer"):
        result = train_model(train, y, valid, yv, [5, 3], TrainConfig(model=model, max_epochs=3), tmp_path / model)
        fp = result.device
        assert fp["device_type"] == "cuda" and fp["device_kind"] in ("cuda", "rocm")
        assert fp["device_memory_gb"] > 0 and (fp["cuda_version"] or fp["hip_version"])
        assert fp["precision"] in ("bf16", "fp16") and fp["tf32_matmul"] is True
        assert roc_auc_score(yv, predict(result.model, valid.numeric, valid.categorical)) > 0.85


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA or ROCm device on this machine")
def test_fp16_with_gradient_scaling_trains_on_gpu(tmp_path):
    (train, y), (valid, yv) = split(9, 20_000, 5_000)
    result = train_model(train, y, valid, yv, [5, 3], TrainConfig(max_epochs=3, precision="fp16"), tmp_path)
    assert result.device["grad_scaling"] is True
    assert roc_auc_score(yv, predict(result.model, valid.numeric, valid.categorical)) > 0.85
