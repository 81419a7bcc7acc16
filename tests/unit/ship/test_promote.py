"""The gate report's model-spec row: what changed since the champion, and whether the two models read the
same inputs."""

from mlflow.entities.model_registry import ModelVersion, ModelVersionTag

from sluicegate.config import Settings
from sluicegate.ship.promote import _spec_row
from sluicegate.spec import load_spec, parse_spec
from sluicegate.train.identity import model_spec, spec_hash


def _version(number: int, spec) -> tuple[ModelVersion, dict]:
    tags = [ModelVersionTag("spec_hash", spec_hash(spec))]
    return (ModelVersion("m", str(number), 0, tags=tags),
            {"dataset": {"spec_hash": spec_hash(spec), "model_spec": model_spec(spec)}})


def test_a_changed_transform_is_listed_and_marks_other_inputs():
    spec = load_spec(Settings().spec_path)
    raw = spec.model_dump(mode="json")
    raw["features"]["numeric"][0]["transform"] = "none"
    changed = parse_spec(raw)
    (champion, champion_raw), (candidate, candidate_raw) = _version(1, spec), _version(2, changed)
    row = _spec_row(candidate, champion, candidate_raw, champion_raw)
    column = spec.features.numeric_columns[0].column
    assert row.passed and row.measured >= 1
    assert f'features.numeric.{column}: "log1p" -> "none"' in row.detail
    assert spec_hash(spec) in row.detail and spec_hash(changed) in row.detail


def test_the_same_spec_means_the_same_inputs():
    spec = load_spec(Settings().spec_path)
    (champion, champion_raw), (candidate, candidate_raw) = _version(1, spec), _version(2, spec)
    row = _spec_row(candidate, champion, candidate_raw, champion_raw)
    assert row.passed and row.measured == 0 and "same model spec" in row.detail
