"""The held-out window, kept with each version so later champions are compared on the same rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sluicegate import runtime
from sluicegate.features.inputs import numeric_inputs
from sluicegate.policy import GatePolicy
from sluicegate.runtime import ModelInput
from sluicegate.ship import evaluate as evaluation
from sluicegate.spec import DatasetSpec

SLICE_PREFIX = "slice:"
CAT_PREFIX = "cat:"


def holdout_frame(inputs: ModelInput, y: np.ndarray, groups: dict[str, np.ndarray],
                  spec: DatasetSpec) -> pd.DataFrame:
    """Model inputs, labels and slice values of the test window, as one table."""
    frame = pd.DataFrame(inputs.numeric, columns=numeric_inputs(spec))
    for i, name in enumerate(spec.categorical_features):
        frame[CAT_PREFIX + name] = inputs.categorical[:, i]
    frame[spec.label] = y
    for name, values in groups.items():
        frame[SLICE_PREFIX + name] = values
    return frame


def read_holdout(frame: pd.DataFrame, spec: DatasetSpec) -> tuple[ModelInput, np.ndarray, dict[str, np.ndarray]]:
    inputs = ModelInput(frame[numeric_inputs(spec)].to_numpy(np.float32),
                        frame[[CAT_PREFIX + c for c in spec.categorical_features]].to_numpy(np.int64))
    groups = {c.removeprefix(SLICE_PREFIX): frame[c].to_numpy() for c in frame.columns if c.startswith(SLICE_PREFIX)}
    return inputs, frame[spec.label].to_numpy(np.float64), groups


def compare_on_holdout(champion_onnx: Path, challenger_onnx: Path, holdout: pd.DataFrame, spec: DatasetSpec,
                       policy: GatePolicy) -> list[evaluation.Comparison]:
    """Both models scored on the challenger's held-out rows; overall and per-slice paired bootstrap."""
    inputs, y, groups = read_holdout(holdout, spec)
    champion = runtime.onnx_predict(runtime.make_session(champion_onnx), inputs)
    challenger = runtime.onnx_predict(runtime.make_session(challenger_onnx), inputs)
    return evaluation.compare_with_champion(y, champion, challenger, groups, policy.bootstrap_samples,
                                            policy.confidence, policy.min_slice_support, policy.min_slice_positives)
