import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from sluicegate.train.config import TrainConfig
from sluicegate.train.loop import predict, train_distilled, train_model
from sluicegate.train.models import FTTransformer, TabularMLP, build_model
from tests.unit.train.test_loop import split, synthetic

CARDS = [5, 3]


@pytest.mark.parametrize("kind, cls", [("mlp", TabularMLP), ("ft_transformer", FTTransformer)])
def test_both_architectures_map_raw_input_to_probabilities(kind, cls):
    rng = np.random.default_rng(0)
    data, _ = synthetic(64, rng)
    model = build_model(kind, 12, CARDS, TrainConfig(), mean=data.numeric.mean(0), std=data.numeric.std(0))
    assert isinstance(model, cls)
    scores = predict(model, data.numeric, data.categorical)
    assert scores.shape == (64,) and np.all((scores > 0) & (scores < 1))
    # Normalization is part of the model, so it follows the weights into the checkpoint and the ONNX graph.
    assert {"mean", "std"} <= set(model.state_dict())


def test_ft_transformer_reads_every_categorical_column():
    torch.manual_seed(0)
    model = build_model("ft_transformer", 12, CARDS, TrainConfig()).eval()
    numeric = torch.zeros(1, 12)
    base = model(numeric, torch.tensor([[1, 1]]))
    assert model(numeric, torch.tensor([[2, 1]])) != base
    assert model(numeric, torch.tensor([[1, 2]])) != base


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="ft_transformer"):
        build_model("xgboost", 12, CARDS, TrainConfig())


def test_ft_transformer_trains_on_cpu(tmp_path):
    (train, y), (valid, yv) = split(0, 6_000, 2_000)
    cfg = TrainConfig(model="ft_transformer", d_token=16, n_blocks=1, max_epochs=2, batch_size=256, device="cpu")
    result = train_model(train, y, valid, yv, CARDS, cfg, tmp_path)
    assert isinstance(result.model, FTTransformer)
    assert roc_auc_score(yv, predict(result.model, valid.numeric, valid.categorical)) > 0.85


def test_distillation_ships_an_mlp_student_and_compares_it_with_the_teacher(tmp_path):
    (train, y), (valid, yv) = split(2, 5_000, 2_000)
    seen = []
    cfg = TrainConfig(d_token=16, n_blocks=1, max_epochs=2, batch_size=256, device="cpu", distill=True)
    student = train_distilled(train, y, valid, yv, CARDS, cfg, tmp_path, on_epoch=seen.append)
    assert isinstance(student.model, TabularMLP)
    assert (tmp_path / "teacher" / "best.pt").exists() and (tmp_path / "student" / "best.pt").exists()
    assert any("teacher_valid_pr_auc" in row for row in seen) and any("valid_pr_auc" in row for row in seen)
    d = student.distillation
    assert d["student_valid_roc_auc"] > 0.85 and d["teacher_valid_roc_auc"] > 0.7
    assert d["student_speedup"] == pytest.approx(d["student_rows_per_s_batch4096"] / d["teacher_rows_per_s_batch4096"])
    assert d["student_roc_auc_drop"] == pytest.approx(d["teacher_valid_roc_auc"] - d["student_valid_roc_auc"])


def test_soft_labels_change_what_the_student_learns(tmp_path):
    (train, y), (valid, yv) = split(3, 4_000, 1_000)
    cfg = TrainConfig(max_epochs=2, batch_size=256, device="cpu", distill_alpha=1.0)
    plain = train_model(train, y, valid, yv, CARDS, cfg, tmp_path / "plain")
    inverted = train_model(train, y, valid, yv, CARDS, cfg, tmp_path / "inv", soft_targets=1 - y)
    # A teacher that says the opposite of the labels, with alpha=1, must flip the ranking.
    assert roc_auc_score(yv, predict(inverted.model, valid.numeric, valid.categorical)) < 0.5
    assert roc_auc_score(yv, predict(plain.model, valid.numeric, valid.categorical)) > 0.8
