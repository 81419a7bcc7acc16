"""Data-parallel training under torchrun: 2 CPU processes joined by gloo reach single-process quality."""

import pytest
import torch
from sklearn.metrics import roc_auc_score

from sluicegate.train import ddp
from sluicegate.train.config import TrainConfig
from sluicegate.train.loop import predict, train_model
from tests.unit.train.test_loop import split


def test_two_gloo_processes_match_one_process(tmp_path):
    (train, y), (valid, yv) = split(0, 12_000, 3_000)
    cfg = TrainConfig(max_epochs=3, patience=10, batch_size=512, device="cpu")
    single = train_model(train, y, valid, yv, [5, 3], cfg, tmp_path / "single")
    seen = []
    parallel = ddp.launch(train, y, valid, yv, [5, 3], TrainConfig(**{**cfg.__dict__, "world_size": 2}),
                          tmp_path / "ddp", on_epoch=seen.append)
    assert parallel.device["world_size"] == 2 and [r["epoch"] for r in seen] == [1, 2, 3]
    assert (tmp_path / "ddp" / "last.pt").exists() and (tmp_path / "ddp" / "best.pt").exists()
    auc_single = roc_auc_score(yv, predict(single.model, valid.numeric, valid.categorical))
    auc_parallel = roc_auc_score(yv, predict(parallel.model, valid.numeric, valid.categorical))
    assert auc_single > 0.85 and auc_parallel > auc_single - 0.01


def test_world_size_follows_visible_gpus_unless_set():
    assert ddp.world_size(TrainConfig(world_size=3)) == 3
    assert ddp.world_size(TrainConfig(device="cpu")) == 1
    expected = torch.cuda.device_count() if torch.cuda.is_available() else 1
    assert ddp.world_size(TrainConfig()) == expected


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP over NCCL/RCCL needs at least 2 GPUs")
def test_two_gpus_train_with_nccl(tmp_path):
    (train, y), (valid, yv) = split(1, 50_000, 10_000)
    result = ddp.launch(train, y, valid, yv, [5, 3], TrainConfig(max_epochs=3, world_size=2), tmp_path)
    assert result.device["device_type"] == "cuda" and result.device["world_size"] == 2
    assert roc_auc_score(yv, predict(result.model, valid.numeric, valid.categorical)) > 0.85
