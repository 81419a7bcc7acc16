"""The training phase's entry points: the run's identity, the time split, the model inputs, training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from sluicegate.config import Settings
from sluicegate.features.inputs import ModelInput, build_model_input, cardinalities
from sluicegate.spec import DatasetSpec
from sluicegate.train import ddp
from sluicegate.train.config import TrainConfig
from sluicegate.train.identity import fingerprint, spec_hash  # noqa: F401 (fingerprint: an entry point of the phase)
from sluicegate.train.loop import TrainResult, checkpoint_dir_for, train_distilled, train_model

SPLITS = (0.70, 0.85)  # time quantiles ending train and validation; the rest is test


SPLIT_SEED = 0  # the random split of a table without a timestamp; recorded on the run


PARTS = ("train", "valid", "test")


@dataclass
class Splits:
    """Which rows of the training frame are train, validation and test. The rows stay in the one frame:
    a copy of each part beside it held the table twice (10M rows: 1.9 GB more)."""

    frame: pd.DataFrame
    part: np.ndarray  # per row of frame: its index in PARTS
    method: str  # how the rows were split, recorded on the run

    def rows(self, name: str) -> pd.DataFrame:
        """One part's rows, in the frame's order: a view of the frame when they are consecutive (a table
        in time order, split by time), else a copy. Read them; copy before changing them."""
        where = np.flatnonzero(self.mask(name))
        consecutive = len(where) > 0 and where[-1] - where[0] + 1 == len(where)
        rows = self.frame.iloc[where[0]:where[-1] + 1] if consecutive else self.frame.iloc[where]
        rows.index = pd.RangeIndex(len(rows))  # reset_index would copy the rows (once more)
        return rows

    def window(self, name: str, spec: DatasetSpec) -> str:
        """The part's time window, or how it was drawn when the table has no timestamp."""
        if not spec.timestamp:
            return self.method
        ts = self.frame[spec.timestamp][self.mask(name)]
        return f"{ts.min():%Y-%m-%d %H:%M} .. {ts.max():%Y-%m-%d %H:%M}"

    def mask(self, name: str) -> np.ndarray:
        """True on the rows of one part (a name in PARTS)."""
        return self.part == PARTS.index(name)


def split(frame: pd.DataFrame, spec: DatasetSpec) -> Splits:
    """By time when the table has a timestamp (train on the past, test on the newest), else a seeded
    random split stratified on the label; 70% train, 15% validation, 15% test either way."""
    y = spec.positive(frame[spec.label]).to_numpy()
    if spec.timestamp:
        ts = pd.to_datetime(frame[spec.timestamp], utc=True)
        cut_valid, cut_test = ts.quantile(SPLITS[0]), ts.quantile(SPLITS[1])
        part = np.select([(ts < cut_valid).to_numpy(), (ts < cut_test).to_numpy()], [0, 1], 2).astype(np.int8)
        method = "time: oldest 70% train, next 15% validation, newest 15% test"
    else:
        part = _stratified(y)
        method = f"stratified random 70/15/15 on {spec.label}, seed {SPLIT_SEED}"
    for i, name in enumerate(("train", "validation", "test")):
        if np.unique(y[part == i]).size < 2:
            raise ValueError(f"the {name} split has only one label class; the batch is too small")
    return Splits(frame, part, method)


def _stratified(y: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(SPLIT_SEED)
    which = np.empty(len(y), dtype=np.int8)
    for cls in (0.0, 1.0):
        rows = rng.permutation(np.flatnonzero(y == cls))
        cut = np.cumsum([round(len(rows) * SPLITS[0]), round(len(rows) * (SPLITS[1] - SPLITS[0]))])
        which[rows[:cut[0]]], which[rows[cut[0]:cut[1]]], which[rows[cut[1]:]] = 0, 1, 2
    return which


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
    """The split and each part's model inputs and labels. The inputs are built once for the whole frame
    and then cut: each row's inputs are its own, so they are exactly each part's, without a copy of
    each part's rows to build them from."""
    splits = split(frame, spec)
    inputs = build_model_input(frame, spec)
    y = spec.positive(frame[spec.label]).to_numpy(np.float32)

    def cut(name: str) -> tuple[ModelInput, np.ndarray]:
        rows = splits.mask(name)
        return inputs.take(rows), y[rows]

    (train, y_train), (valid, y_valid), (test, y_test) = (cut(name) for name in PARTS)
    return Prepared(splits=splits, train=train, valid=valid, test=test, y_train=y_train, y_valid=y_valid,
                    y_test=y_test)


def train_stage(prepared: Prepared, spec: DatasetSpec, cfg: TrainConfig, checkpoint_dir: Path,
                on_epoch=None) -> TrainResult:
    """Train in this process, or under torchrun when more than one device is to be used;
    with `cfg.distill`, an FT-Transformer teacher and then the MLP student that ships."""
    fit = ddp.launch if ddp.world_size(cfg) > 1 else train_model
    start = fresh_start_reason(checkpoint_dir)
    args = (prepared.train, prepared.y_train, prepared.valid, prepared.y_valid, cardinalities(spec), cfg,
            checkpoint_dir)
    result = train_distilled(*args, on_epoch=on_epoch, fit=fit) if cfg.distill else fit(*args, on_epoch=on_epoch)
    result.config, result.fresh_start = cfg, start
    return result


def checkpoint_dir(settings: Settings, data_hash: str, cfg: TrainConfig, spec: DatasetSpec) -> Path:
    """Keyed on data, config and model spec, so a retried or re-run flow resumes from the last epoch and a
    changed spec (a new transform, a dropped feature) starts from scratch."""
    return checkpoint_dir_for(settings.paths.runs / "checkpoints", data_hash, cfg, spec_hash(spec))


def fresh_start_reason(checkpoint_dir: Path) -> str:
    """Why training starts from scratch in this directory, or "" when it resumes a checkpoint."""
    if (checkpoint_dir / "last.pt").exists() or (checkpoint_dir / "student" / "last.pt").exists():
        return ""
    others = sorted(d.name for d in checkpoint_dir.parent.glob("*") if d != checkpoint_dir and d.is_dir())
    if others:
        return (f"trained from scratch: the model spec changed to {checkpoint_dir.name}; this data and "
                f"configuration were trained under model spec {', '.join(others)}")
    return "trained from scratch: no checkpoint of this data, configuration and model spec"
