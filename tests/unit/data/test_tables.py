"""`sluicegate init` and `import` on small tables: what is inferred, what is refused, what is kept."""

import numpy as np
import pandas as pd
import pytest

from sluicegate.data.tables import TableError, derive_row_ids, import_table, infer_spec
from sluicegate.runtime import sha256_file as sha256_of
from sluicegate.spec import DERIVED_ID, parse_spec


def _loans(n=2000, seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    income = rng.gamma(2.0, 20_000, n)
    y = rng.random(n) < 1 / (1 + np.exp(income / 20_000 - 1.5))
    return pd.DataFrame({
        "loan_id": [f"L{i:05d}" for i in range(n)],
        "applied_at": pd.date_range("2026-01-01", periods=n, freq="17min").astype(str),
        "borrower_id": rng.integers(0, 300, n),
        "income": income,
        "grade": rng.choice(["A", "B", "C"], n),
        "defaulted": np.where(y, "yes", "no"),
        "recovered_amount": np.where(y, rng.gamma(1.0, 100, n), 0.0),  # known only after a default
    })


def test_init_infers_types_label_id_timestamp_and_flags_leakage():
    draft = infer_spec(_loans(), "Loans 2026")
    spec = parse_spec(draft.spec)
    assert (spec.name, spec.label, spec.table.positive, spec.id, spec.timestamp) == \
        ("loans-2026", "defaulted", "yes", "loan_id", "applied_at")
    assert spec.columns["grade"].categories == ["A", "B", "C"] and "grade" in spec.categorical_features
    assert spec.columns["income"].min == 0 and spec.features.time == ["hour_of_day", "day_of_week"]
    assert "recovered_amount" in spec.ignore  # alone it separates the classes
    assert any("recovered_amount alone ranks defaulted" in n and "leakage" in n for n in draft.notes)
    low, high = spec.label_rate
    assert low < (_loans()["defaulted"] == "yes").mean() < high


def test_init_refuses_a_label_it_cannot_handle():
    frame = _loans().assign(defaulted=lambda f: np.resize(["yes", "no", "late"], len(f)))
    with pytest.raises(TableError, match="label 'defaulted' has 3 distinct values"):
        infer_spec(frame, "loans", label="defaulted")
    with pytest.raises(TableError, match="pass --label"):
        infer_spec(_loans().rename(columns={"defaulted": "status"}).assign(flag=lambda f: f["status"]), "loans")


def _spec_for(frame: pd.DataFrame):
    return parse_spec(infer_spec(frame, "loans").spec)


def test_import_lays_out_days_records_the_checksum_and_leaves_the_file_alone(tmp_path):
    source = tmp_path / "loans.csv"
    _loans().to_csv(source, index=False)
    before = sha256_of(source)
    outcome = import_table(source, _spec_for(_loans()), tmp_path / "raw")
    assert sha256_of(source) == before == outcome.sha256
    assert outcome.rows == 2000 and not outcome.derived_id
    days = sorted(p.name for p in outcome.batch_dir.glob("date=*"))
    assert days[0] == "date=2026-01-01" and len(days) == 24
    back = pd.concat(pd.read_parquet(f) for f in sorted(outcome.batch_dir.glob("date=*/*.parquet")))
    assert len(back) == 2000 and str(back["applied_at"].dtype).startswith("datetime64")


@pytest.mark.parametrize("break_it, says", [
    (lambda f: f.drop(columns=["grade"]), "the spec declares columns the table lacks: ['grade']"),
    (lambda f: f.assign(colour="red"), "columns not in the spec: ['colour']"),
    (lambda f: f.assign(grade=["D"] * 3 + list(f["grade"][3:])), "'grade' has values outside its categories"),
    (lambda f: f.assign(loan_id="same"), "the id column 'loan_id' is not unique"),
])
def test_import_refuses_a_table_that_does_not_match_its_spec(tmp_path, break_it, says):
    spec = _spec_for(_loans())
    source = tmp_path / "loans.parquet"
    break_it(_loans()).to_parquet(source)
    with pytest.raises(TableError, match=says.replace("[", r"\[").replace("]", r"\]")):
        import_table(source, spec, tmp_path / "raw")
    assert not (tmp_path / "raw").exists()  # nothing half-written


def test_a_table_without_id_gets_stable_derived_ids(tmp_path):
    frame = _loans().drop(columns=["loan_id", "applied_at"])
    frame = pd.concat([frame, frame.iloc[:2]], ignore_index=True)  # two duplicate rows
    ids = derive_row_ids(frame)
    assert len(set(ids)) == len(frame) and ids == derive_row_ids(frame.copy())
    spec = _spec_for(frame.drop(columns=["recovered_amount"]))
    source = tmp_path / "loans.csv"
    frame.drop(columns=["recovered_amount"]).to_csv(source, index=False)
    outcome = import_table(source, spec, tmp_path / "raw")
    written = pd.read_parquet(outcome.batch_dir / "part-0.parquet")
    assert outcome.derived_id and list(written.columns)[0] == DERIVED_ID and written[DERIVED_ID].is_unique
