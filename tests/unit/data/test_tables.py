"""`sluicegate init` and `import` on small tables: what is inferred, what is refused, what is kept."""

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from sluicegate.data.tables import LEAKAGE_AUC, TableError, derive_row_ids, import_table, infer_spec
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
    assert spec.columns["income"].min == 0 and "income" in _numeric(spec)
    assert "recovered_amount" in spec.ignore  # alone it separates the classes
    assert any("recovered_amount alone predicts defaulted: its values give ROC-AUC 1.000" in n and "leakage" in n
               for n in draft.notes)
    assert "borrower_id" in spec.ignore and "borrower_id" not in _numeric(spec)  # a key, not a quantity
    low, high = spec.label_rate
    assert low < (_loans()["defaulted"] == "yes").mean() < high


def _numeric(spec) -> list[str]:
    return [f.column for f in spec.features.numeric_columns]


def _scored(n=4000, seed=1, rate=0.1) -> pd.DataFrame:
    """An honest table: a strong score, a weak one, a category, and a label drawn from them."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"score": rng.normal(size=n), "noise": rng.normal(size=n),
                          "tier": rng.choice(["gold", "silver", "bronze"], n)})
    logit = 4 * frame["score"] + 0.3 * frame["noise"] + np.log(rate / (1 - rate)) - 2
    frame["outcome"] = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "yes", "no")
    return frame


def _leak_notes(draft, column) -> list[str]:
    return [n for n in draft.notes if n.startswith(f"{column} alone predicts") and "leakage" in n]


def test_a_column_filled_only_after_the_outcome_leaks_through_its_nulls():
    frame = _scored()
    rng = np.random.default_rng(2)
    positive = (frame["outcome"] == "yes").to_numpy()
    # Filled for every positive, values unrelated to anything: only its nulls give the label away.
    frame["refund_amount"] = np.where(positive, rng.gamma(2.0, 50.0, len(frame)), np.nan)
    # A date filed for some positives only (a chargeback), ahead of the column order of the event time.
    filed = positive & (rng.random(len(frame)) < 0.6)
    frame.insert(0, "filed_on", pd.Series(pd.Timestamp("2026-03-01"), index=frame.index).where(filed))
    # Honest missingness: nulls a little likelier for positives, in both classes.
    frame["bureau_score"] = rng.normal(600, 50, len(frame))
    frame.loc[rng.random(len(frame)) < np.where(positive, 0.3, 0.1), "bureau_score"] = np.nan
    draft = infer_spec(frame, "t", label="outcome")
    spec = parse_spec(draft.spec)
    assert spec.timestamp is None  # a date column with nulls is not the event time
    assert {"refund_amount", "filed_on"} <= set(spec.ignore)
    assert "refund_amount" not in _numeric(spec)
    assert "whether it is null gives ROC-AUC 1.000" in _leak_notes(draft, "refund_amount")[0]
    assert "it is present on" in _leak_notes(draft, "filed_on")[0] and "every one positive" in \
        _leak_notes(draft, "filed_on")[0]
    assert {"score", "noise", "bureau_score"} <= set(_numeric(spec)) and not _leak_notes(draft, "bureau_score")


def test_the_leakage_threshold_keeps_strong_honest_features_and_catches_post_outcome_columns():
    frame = _scored()
    honest = roc_auc_score(frame["outcome"] == "yes", frame["score"])
    rng = np.random.default_rng(3)
    errors = rng.random(len(frame)) < 0.005  # a status column written after the outcome, 0.5% mistyped
    frame["status_after"] = np.where((frame["outcome"] == "yes") ^ errors, "closed", "open")
    draft = infer_spec(frame, "t", label="outcome")
    spec = parse_spec(draft.spec)
    assert 0.95 < honest < LEAKAGE_AUC and "score" in _numeric(spec) and not _leak_notes(draft, "score")
    assert "status_after" in spec.ignore and "its values give ROC-AUC 0.99" in _leak_notes(draft, "status_after")[0]


def test_a_few_positives_are_not_called_leakage_by_chance():
    rng = np.random.default_rng(4)
    frame = pd.DataFrame({"x": rng.normal(size=60), "outcome": ["yes"] * 3 + ["no"] * 57})
    frame.loc[:2, "x"] = 10.0  # ranks the three positives first, as one column in many might by chance
    draft = infer_spec(frame, "t", label="outcome")
    assert "x" in _numeric(parse_spec(draft.spec)) and not _leak_notes(draft, "x")
    assert any("only 3 rows of the rarer class" in n for n in draft.notes)


def test_integer_and_string_columns_unique_on_every_row_are_ids_never_features():
    frame = _scored(n=1000)
    frame.insert(0, "seq", np.arange(1000) * 7 + 3)  # unique integers, no id-like name
    frame["ref"] = [f"R{i:06d}" for i in range(1000)]  # unique codes
    frame["paid"] = np.random.default_rng(5).gamma(2.0, 40.0, 1000)  # unique floats: a measurement
    draft = infer_spec(frame, "t", label="outcome")
    spec = parse_spec(draft.spec)
    assert spec.id == "seq" and any("'seq' is unique on every row: taken as the row id" in n for n in draft.notes)
    assert "ref" in spec.ignore and any(n.startswith("ref: ignored: unique on every row") for n in draft.notes)
    assert "paid" in _numeric(spec)
    with_id = parse_spec(infer_spec(frame, "t", label="outcome", id_column="ref").spec)
    assert with_id.id == "ref" and "seq" in with_id.ignore and "seq" not in _numeric(with_id)


def test_free_text_and_high_cardinality_strings_are_named_with_what_was_done():
    frame = _scored(n=5000)
    rng = np.random.default_rng(6)
    words = np.array(["late", "paid", "call", "back", "asked", "about", "fees", "again", "card", "lost"])
    frame["memo"] = [" ".join(rng.choice(words, 6)) for _ in range(len(frame))]
    frame["branch"] = [f"B{i:03d}" for i in rng.integers(0, 300, len(frame))]
    frame["unused"], frame["version"] = None, 3  # an empty column (once drafted as a category of nothing)
    draft = infer_spec(frame, "t", label="outcome")
    spec = parse_spec(draft.spec)
    distinct = frame["memo"].nunique()
    assert f"memo: ignored: {distinct:,} distinct values in 5,000 rows, looks like free text" in draft.notes
    assert any(n.startswith("branch: ignored: 300 distinct values in 5,000 rows") and "entity key" in n
               for n in draft.notes)
    assert "unused: ignored: null on every row" in draft.notes and "version: ignored: 3 on every row" in draft.notes
    assert {"memo", "branch", "unused", "version"} <= set(spec.ignore)
    for column in spec.ignore:  # nothing dropped without a word
        assert any(n.startswith(f"{column}:") or n.startswith(f"{column} alone") for n in draft.notes), column


def _timed(stamps: pd.Series, night_rate: float, rate=0.05, seed=7) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    p = np.where(stamps.dt.hour < 6, night_rate, rate)
    return pd.DataFrame({"opened_at": stamps.astype(str), "x": rng.normal(size=len(stamps)),
                         "outcome": np.where(rng.random(len(stamps)) < p, "yes", "no")})


def _random_times(n=5000, seed=8) -> pd.Series:
    rng = np.random.default_rng(seed)
    return pd.Series(pd.Timestamp("2026-01-01") + pd.to_timedelta(rng.integers(0, 90 * 86400, n), unit="s"))


def test_time_features_are_drafted_only_where_the_label_rate_varies_with_them():
    hourly = infer_spec(_timed(_random_times(), night_rate=0.2), "t", label="outcome")
    assert parse_spec(hourly.spec).features.time == ["hour_of_day"]
    assert any(n.startswith("hour_of_day: the label rate varies by hour") for n in hourly.notes)
    flat = infer_spec(_timed(_random_times(), night_rate=0.05), "t", label="outcome")
    assert parse_spec(flat.spec).features.time == []
    assert any(n.startswith("no hour_of_day: the label rate does not vary by hour beyond chance")
               for n in flat.notes)
    dates = infer_spec(_timed(_random_times().dt.normalize(), night_rate=0.9), "t", label="outcome")
    assert "hour_of_day" not in parse_spec(dates.spec).features.time
    assert "no hour_of_day: the timestamps carry no time of day" in dates.notes


def test_notes_and_the_drafted_yaml_hold_plain_numbers(tmp_path):
    rng = np.random.default_rng(9)
    n = 3000
    frame = pd.DataFrame({"x": rng.normal(size=n), "count": rng.integers(0, 9, n), "flag": rng.random(n) < 0.3})
    frame["y"] = (rng.random(n) < 1 / (1 + np.exp(-frame["x"] + 2))).astype(float)  # 0.0 / 1.0
    frame["after"] = np.where(frame["y"] == 1.0, rng.normal(size=n), np.nan)
    draft = infer_spec(frame, "t", label="y")
    text = draft.to_yaml(tmp_path / "t.csv")
    assert draft.spec["table"]["positive"] == 1.0 and any("positive value 1.0" in n for n in draft.notes)
    assert "np." not in text and not any("np." in note for note in draft.notes)
    with pytest.raises(TableError) as refused:
        infer_spec(frame.assign(y=np.resize([3, 7, 9], n)), "t", label="y")
    assert "(3, 7, 9)" in str(refused.value) and "np." not in str(refused.value)


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
