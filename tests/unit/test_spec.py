import pytest
import yaml
from pydantic import ValidationError

from sluicegate.spec import DEFAULT_SPEC_PATH, DatasetSpec


def test_default_spec_names_only_declared_columns(spec):
    assert spec.id in spec.columns and spec.label in spec.columns
    assert set(spec.slices) <= set(spec.columns)
    assert all(spec.categories(c) for c in spec.categorical_features)


def test_spec_rejects_undeclared_column():
    raw = yaml.safe_load(DEFAULT_SPEC_PATH.read_text())
    raw["slices"] = ["channel", "planet"]
    with pytest.raises(ValidationError, match="planet"):
        DatasetSpec.model_validate(raw)


def test_spec_rejects_categorical_without_categories():
    raw = yaml.safe_load(DEFAULT_SPEC_PATH.read_text())
    raw["columns"]["channel"].pop("categories")
    with pytest.raises(ValidationError, match="channel"):
        DatasetSpec.model_validate(raw)
