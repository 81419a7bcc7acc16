"""Late labels: the import and its folder format, the reader's quarantine, live performance per
label maturity, and the CBPE estimate against measured precision and recall."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from sluicegate.cli import app
from sluicegate.config import Settings
from sluicegate.operate import labels as lab

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def _csv(tmp_path, frame: pd.DataFrame, name: str = "late.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


# --- import ----------------------------------------------------------------------------------------


def test_import_writes_one_file_in_the_folder_format_and_leaves_the_input_alone(tmp_path, spec):
    source = _csv(tmp_path, pd.DataFrame({spec.id: ["007", "a2", "a3", "a2"], spec.label: [0, 1, 0, 0],
                                          "extra": ["x", "y", "z", "w"]}))
    before, mtime = source.read_bytes(), source.stat().st_mtime_ns
    out = lab.import_labels(source, spec, tmp_path / "labels", NOW)

    assert out.path.parent == tmp_path / "labels" / "labelled_date=2026-11-20"
    assert out.path.name.startswith("labels-20261120T120000Z-") and out.path.suffix == ".parquet"
    assert len(out.path.stem.rsplit("-", 1)[1]) == 8
    assert (out.rows, out.duplicates) == (3, 1)
    assert "1 duplicate id" in out.summary() and "3 labels" in out.summary()
    written = pd.read_parquet(out.path)
    assert list(written.columns) == [spec.id, spec.label, "labelled_at"]
    # the last row of a repeated id wins; a string id keeps its leading zeros
    assert dict(zip(written[spec.id], written[spec.label], strict=True)) == {"007": 0, "a3": 0, "a2": 0}
    assert str(written["labelled_at"].dt.tz) == "UTC" and (written["labelled_at"] == pd.Timestamp(NOW)).all()
    assert source.read_bytes() == before and source.stat().st_mtime_ns == mtime
    assert [p.name for p in (tmp_path / "labels").rglob("*")] == ["labelled_date=2026-11-20", out.path.name]


def test_import_keeps_given_labelled_at_and_reads_parquet(tmp_path, spec):
    source = tmp_path / "late.parquet"
    pd.DataFrame({spec.id: ["a", "b"], spec.label: [1, 0],
                  "labelled_at": ["2026-11-18T08:00:00Z", None]}).to_parquet(source)
    written = pd.read_parquet(lab.import_labels(source, spec, tmp_path / "labels", NOW).path)
    assert list(written["labelled_at"]) == [pd.Timestamp("2026-11-18T08:00:00Z"), pd.Timestamp(NOW)]


def test_bad_label_values_are_refused_naming_them_and_their_counts(tmp_path, spec):
    source = _csv(tmp_path, pd.DataFrame({spec.id: list("abcdef"), spec.label: ["1", "0", "yes", "yes", "2", "1"]}))
    with pytest.raises(lab.LabelError) as err:
        lab.import_labels(source, spec, tmp_path / "labels", NOW)
    text = str(err.value)
    assert str(source) in text and repr(spec.label) in text
    assert "'yes' (2 rows)" in text and "'2' (1 row)" in text and "3 label value(s)" in text
    assert not (tmp_path / "labels").exists()


def test_missing_labels_and_columns_are_refused_naming_the_column_and_file(tmp_path, spec):
    nulls = _csv(tmp_path, pd.DataFrame({spec.id: ["a", "b"], spec.label: [1, None]}), "nulls.csv")
    with pytest.raises(lab.LabelError, match=r"null \(1 row\)"):
        lab.import_labels(nulls, spec, tmp_path / "labels", NOW)
    for missing in (spec.id, spec.label):
        frame = pd.DataFrame({spec.id: ["a"], spec.label: [1]}).drop(columns=[missing])
        source = _csv(tmp_path, frame, f"no-{missing}.csv")
        with pytest.raises(lab.LabelError, match=f"{source}: no column '{missing}'"):
            lab.import_labels(source, spec, tmp_path / "labels", NOW)
    empty = _csv(tmp_path, pd.DataFrame({spec.id: [], spec.label: []}), "empty.csv")
    with pytest.raises(lab.LabelError, match="no rows"):
        lab.import_labels(empty, spec, tmp_path / "labels", NOW)
    with pytest.raises(lab.LabelError, match="not found"):
        lab.import_labels(tmp_path / "absent.csv", spec, tmp_path / "labels", NOW)


# --- reading back ----------------------------------------------------------------------------------


def test_a_corrupt_label_file_is_quarantined_with_its_reason_and_counted(tmp_path, spec):
    labels, quarantine = tmp_path / "labels", tmp_path / "quarantine"
    good = lab.import_labels(_csv(tmp_path, pd.DataFrame({spec.id: ["a", "b"], spec.label: [1, 0]})), spec,
                             labels, NOW).path
    corrupt = labels / "labelled_date=2026-11-19" / "labels-broken.parquet"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_bytes(good.read_bytes()[:40])  # a torn file
    wrong = labels / "labelled_date=2026-11-19" / "labels-wrong.parquet"
    pd.DataFrame({"other": [1]}).to_parquet(wrong)

    frame, quarantined = lab.read_labels(labels, spec, quarantine)

    assert len(quarantined) == 2 and sorted(frame[spec.id]) == ["a", "b"]
    assert not corrupt.exists() and not wrong.exists() and good.exists()
    by_name = {q.source.name: q for q in quarantined}
    assert by_name["labels-broken.parquet"].reason.startswith("unreadable")
    assert "lacks the column(s)" in by_name["labels-wrong.parquet"].reason and spec.id in by_name[
        "labels-wrong.parquet"].reason
    for item in quarantined:
        assert item.path.parent == quarantine / "labels" and item.path.exists()
        reason = item.path.with_name(item.path.name + ".reason.txt").read_text()
        assert str(item.source) in reason and item.reason in reason
    # quarantined once: the next read finds only the good file
    again, none = lab.read_labels(labels, spec, quarantine)
    assert none == [] and len(again) == 2


def test_read_labels_of_no_folder_is_empty(tmp_path, spec):
    frame, quarantined = lab.read_labels(tmp_path / "none", spec, tmp_path / "q")
    assert frame.empty and quarantined == [] and list(frame.columns) == [spec.id, spec.label, "labelled_at"]


# --- live performance ------------------------------------------------------------------------------


def test_maturity_buckets_count_a_hand_built_log_with_known_ages(spec):
    ages = {"young": 0.5, "two": 2, "ten": 10, "forty": 40}  # days before NOW
    rows = [(f"{name}-{i}", NOW - timedelta(days=age)) for name, age in ages.items() for i in range(4)]
    rows.append(("future-0", NOW + timedelta(hours=1)))  # logged after now: not yet a prediction
    log = pd.DataFrame({"request_id": [r[0] for r in rows], "ts": [r[1] for r in rows],
                        "probability": [0.9, 0.8, 0.2, 0.1] * 4 + [0.9]})
    # labels for half of each group: i = 0 (positive, scored 0.9) and i = 2 (negative, scored 0.2)
    labelled = [f"{name}-{i}" for name in ages for i in (0, 2)]
    labels = pd.DataFrame({spec.id: labelled + ["forty-1", "future-0"],
                           spec.label: [1, 0] * 4 + [1, 1],
                           "labelled_at": [NOW - timedelta(hours=1)] * 8 + [NOW + timedelta(days=1),
                                                                            NOW - timedelta(hours=1)]})
    # "forty-1"'s label arrives after now: unknown at now

    perf = lab.live_performance(log, labels, spec, threshold=0.5, now=NOW)

    assert (perf.predictions, perf.labelled, perf.positives) == (16, 8, 4)
    assert (perf.precision, perf.recall, perf.pr_auc) == (1.0, 1.0, 1.0)
    got = {b["maturity"]: (b["predictions"], b["labelled"], b["positives"]) for b in perf.buckets}
    assert got == {"1d": (12, 6, 3), "7d": (8, 4, 2), "30d": (4, 2, 1)}
    assert [b["coverage"] for b in perf.buckets] == [0.5, 0.5, 0.5]
    assert [r["maturity"] for r in perf.rows()] == ["all", "1d", "7d", "30d"]


def test_live_performance_prefers_the_spec_id_and_falls_back_to_request_id(spec):
    log = pd.DataFrame({spec.id: ["x1", None, "x3"], "request_id": ["r1", "r2", "r3"],
                        "score": [0.9, 0.9, 0.1], "logged_at": [NOW - timedelta(days=2)] * 3})
    labels = pd.DataFrame({spec.id: ["x1", "r2", "x3", "r1"], spec.label: [1, 0, 1, 0],
                           "labelled_at": [NOW - timedelta(hours=1)] * 4})
    perf = lab.live_performance(log, labels, spec, threshold=0.5, now=NOW, maturities=("1d",))
    # x1 (tp), r2 (fp, through request_id), x3 (fn); r1 is not a logged id since x1 names that row
    assert (perf.labelled, perf.positives, perf.precision, perf.recall) == (3, 2, 0.5, 0.5)
    assert perf.pr_auc is not None and perf.buckets[0]["labelled"] == 3


def test_pr_auc_is_none_with_one_class_and_nothing_flagged_gives_no_precision(spec):
    log = pd.DataFrame({"request_id": ["a", "b"], "score": [0.1, 0.2], "ts": [NOW - timedelta(days=3)] * 2})
    labels = pd.DataFrame({spec.id: ["a", "b"], spec.label: [0, 0], "labelled_at": [NOW] * 2})
    perf = lab.live_performance(log, labels, spec, 0.5, NOW)
    assert (perf.precision, perf.recall, perf.pr_auc, perf.labelled) == (None, None, None, 2)
    with pytest.raises(ValueError, match="score"):
        lab.live_performance(log.drop(columns=["score"]), labels, spec, 0.5, NOW)


# --- CBPE ------------------------------------------------------------------------------------------


def _calibrated(seed: int = 7, rows: int = 20_000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    p = rng.beta(0.7, 1.5, rows)
    return p, (rng.random(rows) < p).astype(int)


def _measured(scores: np.ndarray, y: np.ndarray, threshold: float) -> dict:
    flagged = scores >= threshold
    return {"precision": y[flagged].mean(), "recall": y[flagged].sum() / y.sum(), "positives": int(y.sum()),
            "labelled": len(y)}


def test_cbpe_on_calibrated_scores_is_within_two_points_and_fails_on_miscalibrated_ones():
    p, y = _calibrated()
    estimate = lab.estimate_performance(p, 0.5)
    errors = {r["metric"]: r["abs_error"] for r in lab.compare_estimate(estimate, _measured(p, y, 0.5))}
    assert errors["precision"] <= 0.02 and errors["recall"] <= 0.02
    assert estimate.expected_positives == pytest.approx(p.sum())
    assert estimate.expected_tp + estimate.expected_fp + estimate.expected_fn + estimate.expected_tn == \
        pytest.approx(len(p))
    # the same labels, scores squared: no longer calibrated, and the estimate is visibly off
    squared = p ** 2
    off = {r["metric"]: r["abs_error"] for r in
           lab.compare_estimate(lab.estimate_performance(squared, 0.5), _measured(squared, y, 0.5))}
    assert off["precision"] > 0.05 and off["recall"] > 0.05
    assert max(off.values()) > 3 * max(errors.values())


def test_cbpe_formula_on_a_tiny_case_and_refuses_non_probabilities():
    est = lab.estimate_performance([0.9, 0.6, 0.3, 0.1], 0.5)
    assert (est.expected_tp, est.expected_fp) == pytest.approx((1.5, 0.5))
    assert (est.expected_fn, est.expected_tn) == pytest.approx((0.4, 1.6))
    assert est.precision == pytest.approx(0.75) and est.recall == pytest.approx(1.5 / 1.9)
    assert lab.estimate_performance([0.1, 0.2], 0.5).precision is None
    with pytest.raises(ValueError, match="probabilities"):
        lab.estimate_performance([0.5, 1.5], 0.5)


def test_estimated_drop_says_why_only_beyond_max_drop():
    est = lab.estimate_performance([0.9, 0.6, 0.3, 0.1], 0.5)  # precision 0.75, recall 0.789
    assert lab.estimated_drop(est, {"precision": 0.80, "recall": 0.80}, max_drop=0.1) is None
    reason = lab.estimated_drop(est, {"precision": 0.95, "recall": 0.80}, max_drop=0.1)
    assert reason.startswith("estimated precision 0.750 is 0.200 below the champion's test-set 0.950")
    assert "recall" not in reason
    assert lab.estimated_drop(est, {"precision": None}, max_drop=0.1) is None


# --- the command -----------------------------------------------------------------------------------


def test_cli_imports_a_csv_into_the_folder_format(tmp_path, home, spec):
    source = _csv(tmp_path, pd.DataFrame({spec.id: ["a", "b", "c"], spec.label: [1, 0, 0]}))
    result = CliRunner().invoke(app, ["labels", str(source)])
    assert result.exit_code == 0, result.output
    files = list((home / "tables" / spec.name / "labels").glob("labelled_date=*/labels-*-*.parquet"))
    assert len(files) == 1 and str(files[0]) in result.output and "3 labels" in result.output
    assert list(pd.read_parquet(files[0]).columns) == [spec.id, spec.label, "labelled_at"]


def test_cli_refuses_bad_labels_in_one_line_with_exit_2(tmp_path, home, spec):
    source = _csv(tmp_path, pd.DataFrame({spec.id: ["a", "b"], spec.label: [1, 7]}))
    result = CliRunner().invoke(app, ["labels", str(source)])
    assert result.exit_code == 2 and "error:" in result.output and "7 (1 row)" in result.output
    assert "Traceback" not in result.output


def test_cli_report_prints_live_figures_per_maturity_and_the_estimate(tmp_path, home, spec):
    paths = Settings().paths
    now = datetime.now(UTC)
    log_dir = paths.predictions / "v2"
    log_dir.mkdir(parents=True)
    pd.DataFrame({"request_id": ["a", "b", "c", "d"], "probability": [0.9, 0.7, 0.4, 0.1],
                  "ts": [now - timedelta(days=d) for d in (0.2, 3, 10, 40)]}).to_parquet(log_dir / "p-1.parquet")
    (log_dir / "p-2.parquet").write_bytes(b"not parquet")
    source = _csv(tmp_path, pd.DataFrame({spec.id: ["a", "b", "c", "d"], spec.label: [1, 0, 1, 0]}))
    result = CliRunner().invoke(app, ["labels", str(source), "--report", "--threshold", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    for text in ("Live performance at threshold 0.5", "30d", "CBPE on 4 predictions",
                 "on the 4 labelled ones", "quarantined unreadable prediction file"):
        assert text in result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["live"]["labelled"] == 4 and report["estimate"]["rows"] == 4
    assert report["quarantined"] == [str(paths.quarantine / "predictions" / "v2" / "p-2.parquet")]


def test_labels_meet_their_predictions_by_token_when_the_id_is_pii(tmp_path):
    import yaml

    from sluicegate.config import HomePaths
    from sluicegate.operate.monitor import read_prediction_log
    from sluicegate.serve import privacy
    from sluicegate.serve.predlog import PredictionLog, Record
    from sluicegate.spec import DEFAULT_SPEC_PATH, parse_spec

    raw = yaml.safe_load(DEFAULT_SPEC_PATH.read_text())
    raw["columns"]["transaction_id"]["pii"] = True
    spec = parse_spec(raw)
    paths = HomePaths(tmp_path / "home", spec.name)
    log = PredictionLog(paths.predictions, max_queue=10, flush_seconds=3600, redact=privacy.log_redactor(spec, paths))
    sent = ["t-1", "t-2", 42]  # an id sent as a number meets its label written as text
    log.put(Record("predict", (NOW - timedelta(days=2)).timestamp(), "m", "1", sent, [0.5] * 3, [1] * 3,
                   np.array([0.9, 0.1, 0.8]), {"channel": ["pos"] * 3}, 0.5))
    log.close()
    logged = read_prediction_log(paths.predictions).frame
    assert not set(logged["request_id"]) & {"t-1", "t-2", "42"}
    source = _csv(tmp_path, pd.DataFrame({spec.id: ["t-1", "t-2", "42"], spec.label: [1, 0, 1]}))
    lab.import_labels(source, spec, paths.labels, NOW - timedelta(hours=1))

    known, _ = lab.read_labels(paths.labels, spec, paths.quarantine, privacy.pseudonyms(spec, paths))
    perf = lab.live_performance(logged, known, spec, threshold=0.5, now=NOW)
    assert (perf.predictions, perf.labelled, perf.positives, perf.precision, perf.recall) == (3, 3, 2, 1.0, 1.0)
    with pytest.raises(ValueError, match="columns.transaction_id.pii: the id is personal data"):
        lab.read_labels(paths.labels, spec, paths.quarantine)
