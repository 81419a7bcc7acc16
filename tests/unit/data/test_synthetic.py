import numpy as np
import pandas as pd
import pytest

from sluicegate.data.batches import quarantine_batch, read_batch, write_batch
from sluicegate.data.synthetic import FAULTS, GenerateConfig, generate_transactions, inject_fault


@pytest.fixture(scope="module")
def batch():
    from sluicegate.spec import load_spec
    return generate_transactions(GenerateConfig(rows=20_000, days=5, seed=11), load_spec())


def test_deterministic_from_seed(spec, batch):
    again = generate_transactions(GenerateConfig(rows=20_000, days=5, seed=11), spec)
    pd.testing.assert_frame_equal(batch, again)
    other = generate_transactions(GenerateConfig(rows=20_000, days=5, seed=12), spec)
    assert not batch["amount"].equals(other["amount"])


def test_columns_types_and_label_rate(spec, batch):
    assert list(batch.columns) == spec.column_names
    assert len(batch) == 20_000
    assert batch[spec.id].is_unique
    assert 0.01 <= batch[spec.label].mean() <= 0.03
    for col in spec.categorical_features:
        assert set(batch[col]) <= set(spec.categories(col))
    ts = batch[spec.timestamp]
    assert ts.min() >= pd.Timestamp("2026-10-01", tz="UTC") and ts.max() < pd.Timestamp("2026-10-06", tz="UTC")


def test_fraud_signal_comes_from_velocity_amount_and_night(spec, batch):
    fraud = batch[batch[spec.label] == 1]
    legit = batch[batch[spec.label] == 0]
    night = lambda df: (df[spec.timestamp].dt.hour < 6).mean()  # noqa: E731
    assert night(fraud) > 2 * night(legit)
    assert fraud["amount"].median() > 1.5 * legit["amount"].median()
    gap = batch.groupby("customer_id")[spec.timestamp].diff().dt.total_seconds()
    assert (gap[fraud.index] < 1800).mean() > 2 * (gap[legit.index] < 1800).mean()


@pytest.mark.parametrize("drift, column", [("amount", "amount"), ("category", "merchant_category"),
                                           ("country", "country")])
def test_drift_shifts_its_column(spec, batch, drift, column):
    drifted = generate_transactions(GenerateConfig(rows=20_000, days=5, seed=11, drift=drift), spec)
    if column == "amount":
        assert drifted[column].mean() > 1.5 * batch[column].mean()
    else:
        base = batch[column].value_counts(normalize=True)
        new = drifted[column].value_counts(normalize=True).reindex(base.index, fill_value=0)
        assert (base - new).abs().sum() > 0.3


@pytest.mark.parametrize("fault", [f for f in FAULTS if f != "none"])
def test_every_fault_changes_the_batch(spec, batch, fault):
    broken = inject_fault(batch, fault, spec, seed=1)
    assert not broken.equals(batch)


def test_write_read_and_quarantine_keep_every_row(tmp_path, spec, batch):
    batch_dir = write_batch(batch, tmp_path / "raw", "b1", spec.timestamp)
    assert sorted(p.name for p in batch_dir.iterdir()) == [f"date=2026-10-0{d}" for d in range(1, 6)]
    back = read_batch(batch_dir)
    assert len(back) == len(batch) and set(back[spec.id]) == set(batch[spec.id])
    moved = quarantine_batch(batch_dir, tmp_path / "quarantine")
    assert not batch_dir.exists() and len(read_batch(moved)) == len(batch)


def test_rejects_tiny_batches(spec):
    with pytest.raises(ValueError, match="at least 100 rows"):
        generate_transactions(GenerateConfig(rows=10), spec)


def test_generates_200k_rows_quickly_enough_for_the_demo(spec):
    # Not a timing assertion: a sanity check that the full-size batch is well formed.
    df = generate_transactions(GenerateConfig(rows=200_000, days=30, seed=7), spec)
    assert len(df) == 200_000 and np.isfinite(df["amount"]).all()
