import numpy as np
import pandas as pd
import pytest

from sluicegate.config import Settings
from sluicegate.features.inputs import FEATURE_DEFAULTS, build_model_input, encode_categories, utc_hour_of_day
from sluicegate.spec import load_spec


@pytest.fixture(scope="module")
def spec():
    return load_spec(Settings().spec_path)


def _frame(spec, n=6):
    rng = np.random.default_rng(3)
    frame = pd.DataFrame({
        spec.amount: rng.gamma(2.0, 30.0, n),
        spec.timestamp: pd.date_range("2026-10-01 22:15", periods=n, freq="97min", tz="UTC"),
        **{c: [spec.categories(c)[i % len(spec.categories(c))] for i in range(n)] for c in spec.categorical_features},
        **{name: rng.uniform(0, 5, n) for name in FEATURE_DEFAULTS},
    })
    frame.loc[0, "cust_amount_mean_7d"] = np.nan  # a customer with no history
    return frame


def test_a_frame_and_a_dict_of_arrays_give_the_same_tensors(spec):
    frame = _frame(spec)
    columns = {name: frame[name].to_numpy() for name in frame.columns}
    columns[spec.timestamp] = frame[spec.timestamp].dt.tz_localize(None).to_numpy()  # naive means UTC
    from_frame, from_dict = build_model_input(frame, spec), build_model_input(columns, spec)
    np.testing.assert_array_equal(from_frame.numeric, from_dict.numeric)
    np.testing.assert_array_equal(from_frame.categorical, from_dict.categorical)
    assert from_frame.numeric.dtype == np.float32 and from_frame.categorical.dtype == np.int64


def test_hour_of_day_is_taken_in_utc_whatever_the_zone():
    local = pd.Series(pd.to_datetime(["2024-03-01 05:30", "2024-03-01 23:59"]).tz_localize("America/New_York"))
    np.testing.assert_allclose(utc_hour_of_day(local), [10.5, 4 + 59 / 60])
    naive = np.array(["2024-03-01T05:30:59"], dtype="datetime64[s]")
    np.testing.assert_allclose(utc_hour_of_day(naive), [5.5])  # seconds are dropped, as minutes are kept


def test_unknown_and_missing_categories_encode_to_zero():
    codes = encode_categories(["pos", "teleport", None, "online"], ["online", "pos"])
    assert codes.tolist() == [2, 0, 0, 1]


def test_missing_features_take_their_defaults(spec):
    frame = _frame(spec, n=2)
    frame["cust_txn_count_1h"] = pd.array([None, 2.0], dtype="Float64")  # nullable, as a join can leave it
    got = build_model_input(frame, spec).numeric[:, 2]  # log1p(count 1h)
    np.testing.assert_allclose(got, [0.0, np.log1p(2.0)], rtol=1e-6)
