"""The time split and the model inputs of each part."""

import numpy as np
import pandas as pd
import pytest

from sluicegate.config import Settings
from sluicegate.features.inputs import build_model_input
from sluicegate.spec import load_spec, parse_spec
from sluicegate.train.config import TrainConfig
from sluicegate.train.identity import spec_hash
from sluicegate.train.loop import checkpoint_dir_for
from sluicegate.train.stages import prepare, split, train_stage


@pytest.fixture(scope="module")
def spec():
    return load_spec(Settings().spec_path)


def _training_frame(spec, n=2000):
    """A training frame as the feature stage gives it: the spec's model columns, a label, shuffled times."""
    rng = np.random.default_rng(11)
    return pd.DataFrame({
        **{f.column: rng.gamma(2.0, 30.0, n) for f in spec.features.numeric_columns},
        spec.timestamp: (pd.Timestamp("2026-10-01", tz="UTC")
                         + pd.to_timedelta(rng.permutation(n) * 97, unit="s")),
        **{c: [spec.categories(c)[i % len(spec.categories(c))] for i in rng.integers(0, 50, n)]
           for c in spec.categorical_features},
        **{name: rng.uniform(0, 5, n) for name in spec.feature_columns},
        spec.label: (rng.random(n) < 0.2).astype(np.int64),
    })


def test_time_split_trains_on_the_oldest_and_tests_on_the_newest(spec):
    frame = _training_frame(spec)
    splits = split(frame, spec)
    train, valid, test = (splits.rows(name) for name in ("train", "valid", "test"))
    assert len(train) + len(valid) + len(test) == len(frame)
    assert (len(train), len(valid), len(test)) == (1400, 300, 300)
    ts = spec.timestamp
    assert train[ts].max() < valid[ts].min() and valid[ts].max() < test[ts].min()
    # each part keeps the frame's row order
    expected = frame[frame[ts] >= test[ts].min()].reset_index(drop=True)
    pd.testing.assert_frame_equal(test, expected)
    assert splits.window("test", spec) == f"{test[ts].min():%Y-%m-%d %H:%M} .. {test[ts].max():%Y-%m-%d %H:%M}"


def test_each_parts_inputs_are_the_inputs_of_its_own_rows(spec):
    frame = _training_frame(spec)
    prepared = prepare(frame, spec)
    for name in ("train", "valid", "test"):
        rows = prepared.splits.rows(name)
        expected = build_model_input(rows, spec)
        got = getattr(prepared, name)
        np.testing.assert_array_equal(got.numeric, expected.numeric, err_msg=name)
        np.testing.assert_array_equal(got.categorical, expected.categorical, err_msg=name)
        np.testing.assert_array_equal(getattr(prepared, f"y_{name}"), rows[spec.label].to_numpy(np.float32))


def test_a_part_with_one_label_class_is_refused(spec):
    frame = _training_frame(spec)
    newest = frame[spec.timestamp] >= frame[spec.timestamp].quantile(0.85)
    frame.loc[newest, spec.label] = 0
    with pytest.raises(ValueError, match="the test split has only one label class"):
        split(frame, spec)


def test_a_table_in_time_order_is_split_into_views_not_copies(spec):
    frame = _training_frame(spec).sort_values(spec.timestamp, ignore_index=True)
    splits = split(frame, spec)
    test = splits.rows("test")
    amount = spec.features.numeric_columns[0].column
    assert np.shares_memory(test[amount].to_numpy(), frame[amount].to_numpy())  # 10M rows: 1.3 GB not copied
    pd.testing.assert_frame_equal(test, frame.iloc[-300:].reset_index(drop=True))


def _changed(spec, change):
    """The spec with `change(raw)` applied to its dump, validated again like a spec file."""
    raw = spec.model_dump(mode="json")
    change(raw)
    return parse_spec(raw)


def _no_transform(raw):
    raw["features"]["numeric"][0]["transform"] = "none"


def _one_aggregate_fewer(raw):
    raw["features"]["aggregates"] = raw["features"]["aggregates"][:-1]  # one no other key refers to


@pytest.fixture(scope="module")
def first_training(spec, tmp_path_factory):
    """One finished training of the example spec, and where its checkpoints are."""
    root = tmp_path_factory.mktemp("checkpoints")
    cfg = TrainConfig(max_epochs=2, patience=5, hidden=16, device="cpu")
    frame = _training_frame(spec)
    train_stage(prepare(frame, spec), spec, cfg, checkpoint_dir_for(root, "data", cfg, spec_hash(spec)))
    return frame, cfg, root


def test_the_same_spec_resumes_its_checkpoint(spec, first_training):
    frame, cfg, root = first_training
    again = train_stage(prepare(frame, spec), spec, cfg, checkpoint_dir_for(root, "data", cfg, spec_hash(spec)))
    assert again.resumed_from_epoch == 2 and again.fresh_start == ""


@pytest.mark.parametrize("change", [_no_transform, _one_aggregate_fewer], ids=["changed-transform", "dropped-feature"])
def test_a_changed_spec_trains_from_scratch_and_says_why(spec, first_training, change):
    frame, cfg, root = first_training
    changed = _changed(spec, change)
    assert spec_hash(changed) != spec_hash(spec)
    prepared = prepare(frame, changed)
    result = train_stage(prepared, changed, cfg, checkpoint_dir_for(root, "data", cfg, spec_hash(changed)))
    assert result.resumed_from_epoch == 0 and result.epochs_run == 2
    assert f"model spec changed to {spec_hash(changed)}" in result.fresh_start
    assert spec_hash(spec) in result.summary()
    assert result.model.mean.shape[0] == prepared.train.numeric.shape[1]  # weights for the new inputs
