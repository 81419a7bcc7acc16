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


@dataclass
class Splits:
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame

    def window(self, name: str, spec: DatasetSpec) -> str:
        ts = getattr(self, name)[spec.timestamp]
        return f"{ts.min():%Y-%m-%d %H:%M} .. {ts.max():%Y-%m-%d %H:%M}"


def time_split(frame: pd.DataFrame, spec: DatasetSpec) -> Splits:
    """Train on the oldest 70% of time, validate on the next 15%, test on the newest."""
    ts = pd.to_datetime(frame[spec.timestamp], utc=True)
    cut_valid, cut_test = ts.quantile(SPLITS[0]), ts.quantile(SPLITS[1])
    train, valid, test = frame[ts < cut_valid], frame[(ts >= cut_valid) & (ts < cut_test)], frame[ts >= cut_test]
    for name, part in (("train", train), ("validation", valid), ("test", test)):
        if part[spec.label].nunique() < 2:
            raise ValueError(f"the {name} window has only one label class; the batch is too small")
    return Splits(train.reset_index(drop=True), valid.reset_index(drop=True), test.reset_index(drop=True))


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
    splits = time_split(frame, spec)
    label = spec.label
    return Prepared(
        splits=splits,
        train=build_model_input(splits.train, spec), valid=build_model_input(splits.valid, spec),
        test=build_model_input(splits.test, spec),
        y_train=splits.train[label].to_numpy(np.float32), y_valid=splits.valid[label].to_numpy(np.float32),
        y_test=splits.test[label].to_numpy(np.float32),
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
