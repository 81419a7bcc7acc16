import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from sluicegate.inputs import ModelInput
from sluicegate.training import TrainConfig, autocast_dtype, pick_device, predict, train_model


def synthetic(n, rng):
    numeric = rng.normal(size=(n, 12)).astype(np.float32)
    categorical = np.stack([rng.integers(0, 5, n), rng.integers(0, 3, n)], axis=1)
    logit = 2.5 * numeric[:, 0] - 2 * numeric[:, 1] + (categorical[:, 0] == 3) * 2 - 4
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return ModelInput(numeric, categorical), y


def test_cpu_training_learns_and_keeps_best_checkpoint(tmp_path):
    rng = np.random.default_rng(0)
    (train, y), (valid, yv) = synthetic(20_000, rng), synthetic(5_000, rng)
    seen = []
    result = train_model(train, y, valid, yv, [5, 3], TrainConfig(max_epochs=6, batch_size=1024, device="cpu"),
                         tmp_path, on_epoch=seen.append)
    assert [r["epoch"] for r in seen] == list(range(1, result.epochs_run + 1))
    assert result.best_valid_pr_auc == max(r["valid_pr_auc"] for r in seen)
    assert roc_auc_score(yv, predict(result.model, valid.numeric, valid.categorical)) > 0.85
    assert (tmp_path / "best.pt").exists() and result.device["device_type"] == "cpu"


def test_training_is_seeded(tmp_path):
    rng = np.random.default_rng(1)
    (train, y), (valid, yv) = synthetic(5_000, rng), synthetic(1_000, rng)
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
