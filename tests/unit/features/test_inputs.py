import numpy as np
import pandas as pd
import pytest

from sluicegate.config import Settings
from sluicegate.features.inputs import (
    MISSING,
    build_model_input,
    encode_categories,
    numeric_inputs,
    python_features,
    tensor_widths,
    time_part,
)
from sluicegate.spec import load_spec, parse_spec


@pytest.fixture(scope="module")
def spec():
    return load_spec(Settings().spec_path)


def _frame(spec, n=6):
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({
        **{f.column: rng.gamma(2.0, 30.0, n) for f in spec.features.numeric_columns},
        spec.timestamp: pd.date_range("2026-10-01 22:15", periods=n, freq="97min", tz="UTC"),
        **{c: [spec.categories(c)[i % len(spec.categories(c))] for i in range(n)] for c in spec.categorical_features},
        **{name: rng.uniform(0, 5, n) for name in spec.feature_columns},
    })
    frame.loc[0, spec.feature_columns[2]] = np.nan  # an entity with no history
    return frame


def test_a_frame_and_a_dict_of_arrays_give_the_same_tensors(spec):
    frame = _frame(spec)
    columns = {name: frame[name].to_numpy() for name in frame.columns}
    columns[spec.timestamp] = frame[spec.timestamp].dt.tz_localize(None).to_numpy()  # naive means UTC
    from_frame, from_dict = build_model_input(frame, spec), build_model_input(columns, spec)
    np.testing.assert_array_equal(from_frame.numeric, from_dict.numeric)
    np.testing.assert_array_equal(from_frame.categorical, from_dict.categorical)
    assert from_frame.numeric.dtype == np.float32 and from_frame.categorical.dtype == np.int64
    assert from_frame.numeric.shape[1] == len(numeric_inputs(spec)) == tensor_widths(spec)[0]


def test_the_layout_follows_the_spec(spec):
    names = numeric_inputs(spec)
    # a count is never missing; a mean without history is, and gets its indicator
    count, mean = spec.features.aggregates[0], spec.features.aggregates[2]
    assert count.feature_name in names and count.feature_name + MISSING not in names
    assert mean.feature_name + MISSING in names
    assert names[-2:] == ["hour_of_day_sin", "hour_of_day_cos"]


def test_missing_values_are_zero_with_their_indicator_and_log1p_keeps_the_sign(spec):
    frame = _frame(spec, n=3)
    mean = spec.features.aggregates[2].feature_name
    frame[mean] = pd.array([None, 2.0, -3.0], dtype="Float64")  # nullable, as a join can leave it
    names = numeric_inputs(spec)
    got = build_model_input(frame, spec).numeric
    np.testing.assert_allclose(got[:, names.index(mean)], [0.0, np.log1p(2.0), -np.log1p(3.0)], rtol=1e-6)
    np.testing.assert_array_equal(got[:, names.index(mean + MISSING)], [1.0, 0.0, 0.0])


def test_time_parts_are_taken_in_utc_whatever_the_zone():
    local = pd.Series(pd.to_datetime(["2024-03-01 05:30", "2024-03-01 23:59"]).tz_localize("America/New_York"))
    np.testing.assert_allclose(time_part(local, "hour_of_day"), [10.5, 4 + 59 / 60])
    np.testing.assert_allclose(time_part(local.dt.as_unit("s"), "hour_of_day"), [10.5, 4 + 59 / 60])
    naive = np.array(["2024-03-01T05:30:59"], dtype="datetime64[s]")
    np.testing.assert_allclose(time_part(naive, "hour_of_day"), [5.5])  # seconds are dropped
    monday = np.array(["2024-03-04T12:00"], dtype="datetime64[m]")  # a Monday
    np.testing.assert_allclose(time_part(monday, "day_of_week"), [0.5])


def test_unknown_and_missing_categories_encode_to_zero_for_strings_integers_and_booleans():
    assert encode_categories(["pos", "teleport", None, "online"], ["online", "pos"]).tolist() == [2, 0, 0, 1]
    assert encode_categories(np.array([3, 7, 1]), [1, 3]).tolist() == [2, 0, 1]
    assert encode_categories([True, False, None], [False, True]).tolist() == [2, 1, 0]
    arrow = pd.Series(["pos", "teleport", None, "online"], dtype="string[pyarrow]")
    assert encode_categories(arrow, ["online", "pos"]).tolist() == [2, 0, 0, 1]


def _spec_with_python(function: str, outputs: list[str]):
    return parse_spec({
        "spec_version": 1, "name": "t",
        "table": {"label": "y", "positive": 1},
        "columns": {"x": {"dtype": "float64"}, "y": {"dtype": "int64", "categories": [0, 1]}},
        "features": {"numeric": ["x"], "python": {"function": function, "outputs": outputs}},
    })


def double_x(frame, spec):  # the escape hatch's contract: one row per row, the declared columns
    return pd.DataFrame({"x2": frame["x"] * 2})


def test_python_features_follow_their_contract():
    spec = _spec_with_python(f"{__name__}:double_x", ["x2"])
    frame = pd.DataFrame({"x": [1.0, 2.5], "y": [0, 1]}, index=[10, 11])
    out = python_features(frame, spec)
    assert out["x2"].tolist() == [2.0, 5.0] and list(out.index) == [10, 11]
    assert "x2" in numeric_inputs(spec) and build_model_input(frame.assign(x2=out["x2"]), spec).numeric.shape == (2, 3)
    with pytest.raises(ValueError, match=r"exactly the columns \['x3'\]"):
        python_features(frame, _spec_with_python(f"{__name__}:double_x", ["x3"]))


def test_a_ratio_is_missing_when_its_denominator_is_not_positive(spec):
    frame = _frame(spec, n=3)
    frame["cust_amount_mean_7d"] = [20.0, 0.0, np.nan]
    frame["amount"] = [10.0, 5.0, 5.0]
    names = numeric_inputs(spec)
    got = build_model_input(frame, spec).numeric
    ratio = names.index("amount_to_usual_7d")
    np.testing.assert_allclose(got[:, ratio], [np.log1p(0.5), 0.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(got[:, names.index("amount_to_usual_7d" + MISSING)], [0.0, 1.0, 1.0])
