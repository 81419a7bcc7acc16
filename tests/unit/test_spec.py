"""The spec format: every bad spec names the offending key and says what to do."""

import pytest
import yaml

from sluicegate.spec import DEFAULT_SPEC_PATH, SpecError, load_spec, parse_spec


def _raw() -> dict:
    return yaml.safe_load(DEFAULT_SPEC_PATH.read_text())


def test_default_spec_names_only_declared_columns(spec):
    assert spec.id in spec.columns and spec.label in spec.columns
    assert set(spec.slices.columns) <= set(spec.columns)
    assert all(spec.categories(c) for c in spec.categorical_features)
    assert spec.registered_model == "fraud-detector" and spec.label_delay.days == 1


def _error(raw: dict) -> str:
    with pytest.raises(SpecError) as err:
        parse_spec(raw, DEFAULT_SPEC_PATH)
    return str(err.value)


def test_an_unknown_key_is_named():
    raw = _raw()
    raw["features"]["colour"] = ["red"]
    assert "features.colour: unknown key" in _error(raw)


def test_a_column_the_spec_uses_but_does_not_declare_is_named():
    raw = _raw()
    raw["slices"]["columns"] = ["channel", "planet"]
    assert "slices.columns: 'planet' is not a declared column" in _error(raw)


def test_a_categorical_without_categories_is_named():
    raw = _raw()
    raw["columns"]["channel"].pop("categories")
    assert "features.categorical: 'channel' needs a 'categories' list" in _error(raw)


def test_the_label_as_a_feature_is_refused():
    raw = _raw()
    raw["features"]["numeric"].append("is_fraud")
    assert "the label 'is_fraud' cannot also be a feature" in _error(raw)


def test_an_aggregate_without_a_timestamp_is_refused_with_its_key():
    raw = _raw()
    del raw["table"]["timestamp"]
    raw["features"]["time"] = []
    assert "features.aggregates[0]: point-in-time aggregates need table.timestamp" in _error(raw)


def test_a_label_with_three_values_is_refused():
    raw = _raw()
    raw["columns"]["is_fraud"]["categories"] = [0, 1, 2]
    assert "table.label: 'is_fraud' declares 3 categories" in _error(raw)


def test_only_binary_tasks_and_this_spec_version_are_accepted():
    raw = _raw()
    raw["table"]["task"] = "regression"
    assert "table.task: task 'regression' is not supported yet" in _error(raw)
    raw = _raw()
    raw["spec_version"] = 2
    assert "spec_version: this Sluicegate reads spec_version 1" in _error(raw)


def test_an_aggregate_of_an_undeclared_entity_and_a_bad_window_are_named():
    raw = _raw()
    raw["features"]["aggregates"][0]["entity"] = "terminal"
    assert "features.aggregates[0].entity: 'terminal' is not declared under 'entities'" in _error(raw)
    raw = _raw()
    raw["features"]["aggregates"][0]["window"] = "soon"
    assert "'soon' is not a duration" in _error(raw)


def test_a_missing_file_says_so(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        load_spec(tmp_path / "nope.yaml")


def test_a_behaviour_check_of_an_unknown_feature_is_named():
    raw = _raw()
    raw["behaviour"]["direction"][0]["feature"] = ["cust_txn_count_1h", "velocity"]
    assert "behaviour.direction[0].feature: 'velocity' is not a numeric feature" in _error(raw)


def test_a_ratio_of_an_unknown_value_is_named():
    raw = _raw()
    raw["features"]["ratios"][0]["denominator"] = "usual"
    assert "features.ratios[0].denominator: 'usual' is neither a numeric column nor a feature" in _error(raw)


def test_pii_and_retention_are_read_and_default_to_none():
    spec = load_spec()
    assert spec.pii_columns == [] and spec.retention is None
    raw = _raw()
    raw["columns"]["customer_id"]["pii"] = True
    raw["table"]["retention"] = "90d"
    spec = parse_spec(raw)
    assert spec.pii_columns == ["customer_id"] and spec.retention.days == 90


def test_a_bad_pii_or_retention_value_names_its_key():
    raw = _raw()
    raw["columns"]["country"]["pii"] = "maybe"
    assert "columns.country.pii: " in _error(raw)
    raw = _raw()
    raw["table"]["retention"] = "a while"
    assert "table.retention: table.retention: 'a while' is not a duration" in _error(raw)
    raw = _raw()
    raw["table"]["retention"] = "12h"  # the example's labels arrive after a day
    assert "table.retention: '12h' must be longer than table.label_delay '1d'" in _error(raw)


def test_the_event_time_cannot_be_pii():
    raw = _raw()
    raw["columns"]["event_timestamp"]["pii"] = True
    assert "columns.event_timestamp.pii: the event time (table.timestamp) cannot be hashed" in _error(raw)
