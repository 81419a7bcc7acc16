"""The held-out window, kept with each version so later champions are compared on the same rows."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from sluicegate import runtime
from sluicegate.features.inputs import build_model_input, cardinalities, numeric_inputs
from sluicegate.policy import GatePolicy
from sluicegate.runtime import ModelInput
from sluicegate.ship import baselines
from sluicegate.ship import evaluate as evaluation
from sluicegate.spec import DatasetSpec

if TYPE_CHECKING:  # deploy reads held-out tables without loading torch
    from sluicegate.train.stages import Prepared

SLICE_PREFIX = "slice:"
CAT_PREFIX = "cat:"
BASELINE_PREFIX = "baseline:"
BLOCK_PREFIX = "block:"  # the bootstrap's resampling unit, in the column's name
RAW_PREFIX = "raw:"  # the test rows themselves, so a model of another spec can build its own inputs


def holdout_frame(inputs: ModelInput, y: np.ndarray, groups: dict[str, np.ndarray], spec: DatasetSpec,
                  blocks: tuple[str, np.ndarray | None] = (evaluation.ROWS, None),
                  baselines: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Model inputs, labels, slice values, each row's resampling block and the baselines' scores of the
    test window, as one table."""
    frame = pd.DataFrame(inputs.numeric, columns=numeric_inputs(spec))
    for i, name in enumerate(spec.categorical_features):
        frame[CAT_PREFIX + name] = inputs.categorical[:, i]
    frame[spec.label] = y
    for name, values in groups.items():
        frame[SLICE_PREFIX + name] = values
    unit, ids = blocks
    if ids is not None:
        frame[BLOCK_PREFIX + unit] = ids
    for name, scores in (baselines or {}).items():
        frame[BASELINE_PREFIX + name] = scores
    return frame


def with_raw_rows(holdout: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """The held-out table with the test rows' raw and feature columns beside the inputs."""
    raw = rows.rename(columns=lambda c: RAW_PREFIX + c).reset_index(drop=True)
    return pd.concat([holdout, raw], axis=1)


def own_inputs(holdout: pd.DataFrame, spec: DatasetSpec) -> ModelInput | str:
    """The inputs `spec` builds from the held-out rows (a champion of another spec reads these), or why
    they cannot be built (a table kept without its rows, or a column that spec reads but these rows lack)."""
    raw = {c.removeprefix(RAW_PREFIX): holdout[c] for c in holdout.columns if c.startswith(RAW_PREFIX)}
    if not raw:
        return "the held-out table was kept without its rows"
    try:
        return build_model_input(pd.DataFrame(raw), spec)
    except KeyError as exc:
        return f"its spec reads {exc}, which the candidate's held-out rows lack"


def read_holdout(frame: pd.DataFrame, spec: DatasetSpec) -> tuple[ModelInput, np.ndarray, dict[str, np.ndarray]]:
    inputs = ModelInput(frame[numeric_inputs(spec)].to_numpy(np.float32),
                        frame[[CAT_PREFIX + c for c in spec.categorical_features]].to_numpy(np.int64))
    groups = {c.removeprefix(SLICE_PREFIX): frame[c].to_numpy() for c in frame.columns if c.startswith(SLICE_PREFIX)}
    return inputs, frame[spec.label].to_numpy(np.float64), groups


def read_blocks(frame: pd.DataFrame) -> tuple[str, np.ndarray | None]:
    """The resampling unit and each row's block; rows when the table was kept without them."""
    column = next((c for c in frame.columns if c.startswith(BLOCK_PREFIX)), None)
    return (evaluation.ROWS, None) if column is None else (column.removeprefix(BLOCK_PREFIX), frame[column].to_numpy())


def read_baselines(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    return {c.removeprefix(BASELINE_PREFIX): frame[c].to_numpy(np.float64) for c in frame.columns
            if c.startswith(BASELINE_PREFIX)}


def score_holdout(onnx_path: Path, holdout: pd.DataFrame, spec: DatasetSpec) -> np.ndarray:
    return runtime.onnx_predict(runtime.make_session(onnx_path), read_holdout(holdout, spec)[0])


def compare_on_holdout(champion_onnx: Path, challenger: np.ndarray, holdout: pd.DataFrame, spec: DatasetSpec,
                       policy: GatePolicy, champion_inputs: ModelInput | None = None) -> list[evaluation.Comparison]:
    """The champion scored on the challenger's held-out rows (on `champion_inputs`, its own inputs of them,
    when its spec differs) against the challenger's scores there; overall and per-slice paired bootstrap,
    resampling the blocks the rows were kept with."""
    _, y, groups = read_holdout(holdout, spec)
    champion = (score_holdout(champion_onnx, holdout, spec) if champion_inputs is None
                else runtime.onnx_predict(runtime.make_session(champion_onnx), champion_inputs))
    unit, blocks = read_blocks(holdout)
    return evaluation.compare_with_champion(y, champion, challenger, groups, policy.bootstrap_samples,
                                            policy.confidence, policy.min_slice_support, policy.min_slice_positives,
                                            blocks=blocks, unit=unit, test=policy.comparison_test)


def lift_over_baseline(challenger: np.ndarray, holdout: pd.DataFrame, spec: DatasetSpec, policy: GatePolicy,
                       baseline: str | None) -> evaluation.Comparison | None:
    """Challenger minus the named baseline (the best on validation) on the same held-out rows; None when
    the table was kept without that baseline's scores."""
    scores = read_baselines(holdout)
    if baseline not in scores:
        return None
    y = holdout[spec.label].to_numpy(np.float64)
    unit, blocks = read_blocks(holdout)
    return evaluation.paired_bootstrap(y, scores[baseline], challenger, policy.bootstrap_samples, policy.confidence,
                                       scope=f"baseline {baseline}", blocks=blocks, unit=unit)


def keep_holdout(prepared: Prepared, spec: DatasetSpec,
                 groups: dict[str, np.ndarray]) -> tuple[pd.DataFrame, list[dict]]:
    """The held-out table of a candidate, with the baselines fitted on its split (their scores in the
    table, their figures returned for the evidence) and each row's resampling block."""
    fitted = baselines.fit_baselines(prepared.train, prepared.y_train, prepared.valid, prepared.y_valid,
                                     prepared.test, prepared.y_test, cardinalities(spec))
    blocks = evaluation.resampling_blocks(prepared.splits.rows("test"), spec)
    frame = holdout_frame(prepared.test, prepared.y_test, groups, spec, blocks,
                          {b.name: b.test_scores for b in fitted})
    return with_raw_rows(frame, prepared.splits.rows("test")), [b.to_dict() for b in fitted]
