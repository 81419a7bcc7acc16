"""The model-relevant part of the spec, its hash and its diff."""

import pytest

from sluicegate.config import Settings
from sluicegate.spec import load_spec, parse_spec
from sluicegate.train.config import TrainConfig
from sluicegate.train.identity import fingerprint, model_spec, spec_diff, spec_hash


@pytest.fixture(scope="module")
def spec():
    return load_spec(Settings().spec_path)


def _changed(spec, change):
    raw = spec.model_dump(mode="json")
    change(raw)
    return parse_spec(raw)


def test_what_shapes_the_model_changes_the_hash_and_the_fingerprint(spec):
    def transform(raw):
        raw["features"]["numeric"][0]["transform"] = "none"

    def categories(raw):
        column = raw["features"]["categorical"][0]
        raw["columns"][column]["categories"] = raw["columns"][column]["categories"][:-1]

    for change in (transform, categories):
        changed = _changed(spec, change)
        assert spec_hash(changed) != spec_hash(spec), change.__name__
        assert fingerprint("d", TrainConfig(), changed) != fingerprint("d", TrainConfig(), spec)


def test_how_a_model_is_judged_does_not_change_it(spec):
    def judging(raw):
        raw["slices"] = {"columns": [], "bands": {}}
        raw["predicts"] = "something else"
        for column in raw["columns"].values():
            column["max"] = None

    assert spec_hash(_changed(spec, judging)) == spec_hash(spec)


def test_the_diff_names_each_changed_key(spec):
    first = spec.features.numeric_columns[0].column
    dropped = spec.features.aggregates[-1].feature_name

    def change(raw):
        raw["features"]["numeric"][0]["transform"] = "none"
        raw["features"]["aggregates"] = raw["features"]["aggregates"][:-1]

    lines = spec_diff(model_spec(spec), model_spec(_changed(spec, change)))
    assert f'features.numeric.{first}: "log1p" -> "none"' in lines
    assert any(line.startswith(f"removed features.aggregates.{dropped}.") for line in lines)
    assert any(line.startswith("inputs.numeric:") for line in lines)  # the tensor layout changed too
    assert spec_diff(model_spec(spec), model_spec(spec)) == []
