"""The validation gate: every injected fault fails with the right check, clean data passes."""

from __future__ import annotations

import filecmp
import json
import multiprocessing
import shutil
from pathlib import Path

import pandas as pd
import pytest

from sluicegate.data.synthetic import FAULTS, GenerateConfig, generate_transactions, inject_fault
from sluicegate.data.validate import (
    ValidationReport,
    build_context,
    build_expectations,
    validate_batch,
    write_report,
)
from sluicegate.spec import load_spec

REPO_CONTEXT = Path(__file__).resolve().parents[3] / "expectations"
CHECKED_IN = ["great_expectations.yml", "expectations/transactions.json",
              "validation_definitions/transactions.json", "checkpoints/transactions_gate.json"]
CFG = GenerateConfig(rows=5000, days=3, seed=1)
WINDOW_START = pd.Timestamp(CFG.start, tz="UTC")
WINDOW_END = WINDOW_START + pd.Timedelta(days=CFG.days)


def _copy_context(target: Path) -> Path:
    # Tests write results and Data Docs: never into the checked-in context.
    shutil.copytree(REPO_CONTEXT, target, ignore=shutil.ignore_patterns("uncommitted"))
    return target


@pytest.fixture(scope="module")
def context_root(tmp_path_factory) -> Path:
    return _copy_context(tmp_path_factory.mktemp("gx") / "expectations")


@pytest.fixture(scope="module")
def spec():
    return load_spec()


@pytest.fixture(scope="module")
def clean(spec) -> pd.DataFrame:
    return generate_transactions(CFG, spec)


def _validate(df, spec, root, batch_id="test-batch", start=WINDOW_START, end=WINDOW_END) -> ValidationReport:
    return validate_batch(df, spec, batch_id, start, end, context_root=root)


def _failed(report: ValidationReport) -> set[tuple[str, str | None]]:
    return {(f.expectation, f.column) for f in report.failures}


def test_clean_batch_passes(clean, spec, context_root):
    report = _validate(clean, spec, context_root)
    assert report.success, report.to_markdown()
    assert report.failures == []
    assert report.row_count == len(clean)
    assert report.evaluated == len(build_expectations(spec))
    assert report.data_docs and Path(report.data_docs.removeprefix("file://")).exists()
    assert "passed all" in report.summary()


# The check each fault must trip, with the spec naming the columns.
EXPECTED_FAILURE = {
    "nulls": lambda s: ("expect_column_values_to_not_be_null", "amount"),
    "out_of_range": lambda s: ("expect_column_values_to_be_between", "amount"),
    "drop_column": lambda s: ("expect_table_columns_to_match_set", None),
    "rename_column": lambda s: ("expect_table_columns_to_match_set", None),
    "bad_dtype": lambda s: ("expect_column_values_to_be_of_type", "amount"),
    "duplicates": lambda s: ("expect_column_values_to_be_unique", s.id),
    "label_flip": lambda s: ("expect_column_values_to_not_be_in_set", s.label),
}


def test_every_fault_has_an_expected_failure():
    assert set(FAULTS) - {"none"} == set(EXPECTED_FAILURE)


@pytest.mark.parametrize("fault", [f for f in FAULTS if f != "none"])
def test_fault_fails_the_right_check(fault, clean, spec, context_root):
    report = _validate(inject_fault(clean, fault, spec, seed=CFG.seed), spec, context_root, f"fault-{fault}")
    assert not report.success
    assert EXPECTED_FAILURE[fault](spec) in _failed(report), report.to_markdown()
    assert f"failed {len(report.failures)} of {report.evaluated} checks" in report.summary()


def test_missing_column_is_reported_not_raised(clean, spec, context_root):
    report = _validate(clean.drop(columns=["device"]), spec, context_root)
    device = [f for f in report.failures if f.column == "device"]
    assert device and all(f.detail == "column 'device' is missing" for f in device)
    (columns,) = [f for f in report.failures if f.expectation == "expect_table_columns_to_match_set"]
    assert "missing ['device']" in columns.detail


def test_bad_dtype_names_the_offending_values(clean, spec, context_root):
    report = _validate(inject_fault(clean, "bad_dtype", spec, seed=1), spec, context_root)
    (check,) = [f for f in report.failures if f.expectation == "expect_column_values_to_be_of_type"]
    assert check.unexpected_count == len(clean)
    assert check.sample_values and all(str(v).endswith(" USD") for v in check.sample_values)


def test_timestamps_outside_the_window_fail(clean, spec, context_root):
    report = _validate(clean, spec, context_root, start=WINDOW_START + pd.Timedelta(days=1))
    assert _failed(report) == {("expect_column_values_to_be_between", spec.timestamp)}
    (check,) = report.failures
    day_one = (clean[spec.timestamp] < WINDOW_START + pd.Timedelta(days=1)).sum()
    assert check.unexpected_count == day_one
    assert check.sample_values and all(v.startswith(CFG.start) for v in check.sample_values)


def test_report_contents(clean, spec, context_root):
    report = _validate(inject_fault(clean, "out_of_range", spec, seed=1), spec, context_root, "range-batch")
    (check,) = report.failures
    assert check.unexpected_count and 0 < check.unexpected_percent < 100
    assert 0 < len(check.sample_values) <= 10
    md = report.to_markdown()
    assert "range-batch" in md and "FAILED" in md
    assert f"{check.unexpected_count:,}" in md
    assert str(check.sample_values[0]) in md
    data = json.loads(json.dumps(report.to_dict()))  # JSON-serializable as it is
    assert data["failures"][0]["unexpected_count"] == check.unexpected_count
    assert data["failures"][0]["sample_values"] == check.sample_values
    summary = report.summary(quarantined_to="/q/range-batch")
    assert summary.startswith("Batch range-batch failed 1 of")
    assert "quarantined to /q/range-batch" in summary and summary.endswith("nothing was trained.")


def test_write_report_writes_both_files(tmp_path):
    report = ValidationReport("b1", success=True, row_count=3, evaluated=2, failures=[], data_docs=None)
    json_path, md_path = write_report(report, tmp_path / "out")
    assert json.loads(json_path.read_text()) == report.to_dict()
    assert md_path.read_text() == report.to_markdown()
    assert (json_path.name, md_path.name) == ("validation_report.json", "validation_report.md")


def test_checked_in_context_matches_the_spec(spec, tmp_path):
    # Rebuilding from the spec must leave the checked-in files byte for byte as they are.
    root = _copy_context(tmp_path / "expectations")
    build_context(root, spec)
    build_context(root, spec)
    for name in CHECKED_IN:
        assert filecmp.cmp(root / name, REPO_CONTEXT / name, shallow=False), name


def _validate_in_child(args) -> bool:
    root, fault = args
    spec = load_spec()
    df = inject_fault(generate_transactions(CFG, spec), fault, spec, seed=1)
    return _validate(df, spec, root, f"child-{fault}").success


def test_two_processes_can_validate_at_once(tmp_path):
    root = _copy_context(tmp_path / "expectations")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = pool.map(_validate_in_child, [(root, "none"), (root, "nulls")])
    assert results == [True, False]
