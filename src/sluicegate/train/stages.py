"""The training phase's entry points: the run's identity, the time split, the model inputs, training."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sluicegate.config import Settings
from sluicegate.features.inputs import ModelInput, build_model_input, cardinalities
from sluicegate.spec import DatasetSpec
from sluicegate.train import ddp
from sluicegate.train.config import TrainConfig
from sluicegate.train.loop import TrainResult, checkpoint_dir_for, train_distilled, train_model

SPLITS = (0.70, 0.85)  # time quantiles ending train and validation; the rest is test


def fingerprint(data_hash: str, cfg: TrainConfig, spec: DatasetSpec, target: str = "cpu") -> str:
    """Identity of a training run's inputs: same data, config, spec and target hardware."""
    payload = json.dumps({"data": data_hash, "config": cfg.model_dump(), "spec": spec.model_dump(), "target": target},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


SPLIT_SEED = 0  # the random split of a table without a timestamp; recorded on the run


@dataclass
class Splits:
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    method: str  # how the rows were split, recorded on the run

    def window(self, name: str, spec: DatasetSpec) -> str:
        """The part's time window, or how it was drawn when the table has no timestamp."""
        if not spec.timestamp:
            return self.method
        ts = getattr(self, name)[spec.timestamp]
        return f"{ts.min():%Y-%m-%d %H:%M} .. {ts.max():%Y-%m-%d %H:%M}"


def split(frame: pd.DataFrame, spec: DatasetSpec) -> Splits:
    """By time when the table has a timestamp (train on the past, test on the newest), else a seeded
    random split stratified on the label; 70% train, 15% validation, 15% test either way."""
    if spec.timestamp:
        ts = pd.to_datetime(frame[spec.timestamp], utc=True)
        cut_valid, cut_test = ts.quantile(SPLITS[0]), ts.quantile(SPLITS[1])
        parts = frame[ts < cut_valid], frame[(ts >= cut_valid) & (ts < cut_test)], frame[ts >= cut_test]
        method = "time: oldest 70% train, next 15% validation, newest 15% test"
    else:
        parts = _stratified(frame, spec)
        method = f"stratified random 70/15/15 on {spec.label}, seed {SPLIT_SEED}"
    for name, part in zip(("train", "validation", "test"), parts, strict=True):
        if spec.positive(part[spec.label]).nunique() < 2:
            raise ValueError(f"the {name} split has only one label class; the batch is too small")
    train, valid, test = (p.reset_index(drop=True) for p in parts)
    return Splits(train, valid, test, method)


def _stratified(frame: pd.DataFrame, spec: DatasetSpec) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(SPLIT_SEED)
    y = spec.positive(frame[spec.label]).to_numpy()
    which = np.empty(len(frame), dtype=np.int8)
    for cls in (0.0, 1.0):
        rows = rng.permutation(np.flatnonzero(y == cls))
        cut = np.cumsum([round(len(rows) * SPLITS[0]), round(len(rows) * (SPLITS[1] - SPLITS[0]))])
        which[rows[:cut[0]]], which[rows[cut[0]:cut[1]]], which[rows[cut[1]:]] = 0, 1, 2
    return frame[which == 0], frame[which == 1], frame[which == 2]


@dataclass
class Prepared:
    splits: Splits
    train: ModelInput
    valid: ModelInput
    test: ModelInput
    y_train: np.ndarray
    y_valid: np.ndarray
    y_test: np.ndarray


def prepare(frame: pd.DataFrame, spec: DatasetSpec) -> Prepared:
    splits = split(frame, spec)

    def y(part: pd.DataFrame) -> np.ndarray:
        return spec.positive(part[spec.label]).to_numpy(np.float32)

    return Prepared(
        splits=splits,
        train=build_model_input(splits.train, spec), valid=build_model_input(splits.valid, spec),
        test=build_model_input(splits.test, spec),
        y_train=y(splits.train), y_valid=y(splits.valid), y_test=y(splits.test),
    )


def train_stage(prepared: Prepared, spec: DatasetSpec, cfg: TrainConfig, checkpoint_dir: Path,
                on_epoch=None) -> TrainResult:
    """Train in this process, or under torchrun when more than one device is to be used;
    with `cfg.distill`, an FT-Transformer teacher and then the MLP student that ships."""
    fit = ddp.launch if ddp.world_size(cfg) > 1 else train_model
    args = (prepared.train, prepared.y_train, prepared.valid, prepared.y_valid, cardinalities(spec), cfg,
            checkpoint_dir)
    result = train_distilled(*args, on_epoch=on_epoch, fit=fit) if cfg.distill else fit(*args, on_epoch=on_epoch)
    result.config = cfg
    return result


def checkpoint_dir(settings: Settings, data_hash: str, cfg: TrainConfig) -> Path:
    """Keyed on data and config, so a retried or re-run flow resumes from the last epoch."""
    return checkpoint_dir_for(settings.paths.runs / "checkpoints", data_hash, cfg)
