"""The operating phase's entry points: the champion's reference profile, the monitor's check of
logged traffic (drift, data quality, live metrics), retention and the retrain window.

Plain functions; `flows/monitor.py` and `flows/retrain.py` wire them to Prefect and MLflow.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from sluicegate import runtime
from sluicegate.config import Settings
from sluicegate.data import batches as data
from sluicegate.data import validate as validation
from sluicegate.features import retrieval
from sluicegate.features.inputs import build_model_input, python_features
from sluicegate.operate import estimate, ingest, labels, retention, retrains, skew, steady
from sluicegate.operate import monitor as mon
from sluicegate.operate.retention import RetentionOutcome
from sluicegate.policy import DriftThresholds
from sluicegate.serve import privacy
from sluicegate.serve.predlog import compact_hours
from sluicegate.ship import registry
from sluicegate.spec import DatasetSpec
from sluicegate.train.identity import spec_hash


def reference_profile(settings: Settings, spec: DatasetSpec, client: MlflowClient,
                      champion: ModelVersion) -> mon.ReferenceProfile:
    """The champion's training window, binned; computed once per champion version and cached."""
    # "-p3": profiles with each reference row's bins, times and scores (steady windows); older caches are rebuilt.
    cached = settings.paths.monitoring / f"reference-v{champion.version}-p3.json"
    if cached.exists():
        return mon.ReferenceProfile.load(cached)
    batch_id = champion.tags.get("batch_id")
    batch = data.read_batch(settings.paths.raw / batch_id)
    rows = mon.reference_rows(batch, spec, mon.parse_window(champion.tags.get("train_window")))
    # The features training read: the feature service's point-in-time rows, from the offline store.
    ref = retrieval.offline_features(settings, spec, rows)
    if spec.features.python:  # after the aggregates, which the function may read
        ref = ref.assign(**python_features(ref, spec))
    onnx_path = registry.download_onnx(client, champion, settings.paths.monitoring / f"champion-v{champion.version}")
    inputs = build_model_input(ref, spec)
    profile = mon.build_profile(ref, spec, champion.version, batch_id, scores=score(onnx_path, inputs),
                                inputs=inputs)
    profile.save(cached)
    return profile


def score(onnx_path: Path, inputs: runtime.ModelInput) -> np.ndarray:
    session = runtime.make_session(onnx_path, providers=["CPUExecutionProvider"])
    return runtime.onnx_predict(session, inputs)


def data_quality(log: pd.DataFrame, spec: DatasetSpec, context_root: Path) -> tuple[bool, list[str]]:
    """The same GX suite as the training gate, on the logged raw columns."""
    frame = mon.quality_frame(log, spec)
    start = end = None
    if spec.timestamp:
        ts = frame[spec.timestamp].dropna()
        start = ts.min() if len(ts) else pd.Timestamp.now(tz="UTC")
        end = (ts.max() if len(ts) else start) + pd.Timedelta(seconds=1)
    report = validation.validate_batch(frame, spec, f"live-{datetime.now(UTC):%Y%m%dT%H%M%S}", start, end,
                                       context_root)
    unreadable = set(privacy.unreadable_columns(spec))  # pii left out of the log, or tokens of open values
    failures = mon.quality_failures([f for f in report.failures if f.column not in unreadable], log, spec)
    return not failures, failures


def check_traffic(settings: Settings, spec: DatasetSpec, thresholds: DriftThresholds, log: pd.DataFrame,
                  profile: mon.ReferenceProfile, client: MlflowClient, champion: ModelVersion,
                  since: pd.Timestamp | None, context_root: Path) -> mon.DriftReport:
    """Drift against the champion's reference, data quality, live metrics on late labels, and the CBPE
    estimate of each model version against its reference's windows of the same size."""
    report = mon.drift_report(log, profile, thresholds, since, mon.event_window(log, spec))
    report.quality_passed, report.quality_failures = data_quality(log, spec, context_root)
    threshold = float(champion.tags.get("threshold", 0.5))
    known, unread = labels.read_labels(settings.paths.labels, spec, settings.paths.quarantine,
                                       privacy.pseudonyms(spec, settings.paths))
    report.quarantined += [str(q.path) for q in unread]
    now = datetime.now(UTC)
    report.live = labels.live_performance(log, known, spec, threshold, now)
    report.estimate = labels.estimate_performance(log[mon.SCORE], threshold)  # all rows, for the headline
    checks = version_estimates(settings, spec, thresholds, log, known, client, champion, profile, now)
    report.estimates = [check.to_dict() for check in checks]
    report.estimated_drop = "; ".join(r for check in checks if (r := check.reason())) or None
    return report


def version_estimates(settings: Settings, spec: DatasetSpec, thresholds: DriftThresholds, log: pd.DataFrame,
                      known: pd.DataFrame, client: MlflowClient, champion: ModelVersion,
                      profile: mon.ReferenceProfile, now: datetime) -> list[estimate.VersionEstimate]:
    """Each model version's rows on their own: its threshold, its reference, its realized figures."""
    served = (log["model_version"].astype("string") if "model_version" in log.columns
              else pd.Series(pd.NA, index=log.index, dtype="string")).fillna(str(champion.version))
    z = steady.family_z(thresholds.false_alarm_rate, len(estimate.METRICS) * served.nunique())
    checks = []
    for version, rows in log.groupby(served, sort=True):
        version = str(version)
        known_version = champion if version == str(champion.version) else _model_version(client, settings, version)
        reference = profile if known_version is champion else _reference_or_none(settings, spec, client,
                                                                                  known_version)
        threshold = float(known_version.tags.get("threshold", 0.5)) if known_version is not None else 0.5
        realized = labels.live_performance(rows, known, spec, threshold, now)
        checks.append(estimate.check_version(version, rows[mon.SCORE].to_numpy(dtype=float), threshold, reference,
                                             mon.event_window(rows, spec), z, thresholds.max_estimated_drop,
                                             realized))
    return checks


def _model_version(client: MlflowClient, settings: Settings, version: str) -> ModelVersion | None:
    try:
        return client.get_model_version(settings.model_name, version)
    except Exception:  # a version deleted from the registry: estimated without its band
        return None


def _reference_or_none(settings: Settings, spec: DatasetSpec, client: MlflowClient,
                       version: ModelVersion | None) -> mon.ReferenceProfile | None:
    if version is None:
        return None
    try:
        return reference_profile(settings, spec, client, version)
    except Exception:  # its training batch is gone: estimated without its band
        return None


def retention_stage(settings: Settings, spec: DatasetSpec, now: datetime | None = None) -> RetentionOutcome:
    """Predictions and labels older than the spec's `table.retention` deleted (nothing without one)."""
    paths = settings.paths
    return retention.apply_retention(paths.predictions, paths.labels, paths.quarantine, spec.retention,
                                     now or datetime.now(UTC))


def retrain_window(settings: Settings, days: int) -> ingest.Window:
    """The newest `days` of raw partitions, linked into one window batch for a retrain."""
    return ingest.assemble_window(settings.paths.raw, days)


class Trigger(Protocol):
    """How the monitor starts a retrain; the Prefect flow provides it (the package knows no Prefect)."""

    name: str  # the deployment it starts

    def active_runs(self) -> int | None:
        """Retrains this monitor started that are still in flight; None when the deployment is not registered."""

    def fire(self, decision: mon.TriggerDecision) -> str:
        """Start the retrain (deduplicated on decision.key); its flow run id."""


@dataclass
class MonitorOutcome:
    status: str  # no_traffic, unlogged (answered, none logged), no_champion, checked or triggered
    reason: str
    rows: int
    report: mon.DriftReport | None = None
    decision: mon.TriggerDecision | None = None
    flow_run_id: str | None = None
    quarantined: list[str] = field(default_factory=list)  # unreadable log files moved aside
    unlogged: int = 0  # rows the server answered but could not log
    skew: dict | None = None  # newly landed served rows against their offline inputs (operate.skew)

    def summary(self) -> str:
        return f"monitor: {self.status}: {self.reason}"

    def to_dict(self) -> dict:
        out = {"status": self.status, "reason": self.reason, "rows": self.rows, "skew": self.skew,
               "quarantined": self.quarantined or (self.report.quarantined if self.report else []),
               "unlogged": self.report.unlogged if self.report else self.unlogged}
        if self.report is not None:
            estimate = self.report.estimate
            out |= {"flow_run_id": self.flow_run_id, "quality_passed": self.report.quality_passed,
                    "quality_failures": self.report.quality_failures,
                    "drifting": [c.name for c in self.report.columns if c.status == "drift"],
                    "estimates": self.report.estimates,
                    "estimate": None if estimate is None else {"precision": estimate.precision,
                                                               "recall": estimate.recall, "rows": estimate.rows}}
        return out


def monitor_stage(settings: Settings, spec: DatasetSpec, thresholds: DriftThresholds, context_root: Path,
                  trigger: Trigger | None) -> MonitorOutcome:
    """The traffic logged since the last run against the champion's reference; a retrain started through
    `trigger` when a threshold is crossed, at most once per cooldown. `trigger=None`: report only."""
    with mon.locked_state(settings.paths.monitoring / "state.json") as state:
        since = pd.Timestamp(state.last_run_at) if state.last_run_at else None
        compact_hours(settings.paths.predictions, time.time())
        read = mon.read_prediction_log(settings.paths.predictions, since,
                                       settings.paths.quarantine / retention.PREDICTIONS_QUARANTINE)
        log = privacy.categories_from_tokens(read.frame, spec, privacy.pseudonyms(spec, settings.paths))
        unlogged = _unlogged(settings, state)
        landed = skew.production_skew(settings, spec, state.skew_checked, _on_spec(settings, spec))
        found = landed.to_dict() if landed else None
        if log.empty:
            return replace(_nothing_logged(since, unlogged, read.quarantined), skew=found)
        state.last_run_at = str(log[mon.LOGGED_AT].max())
        client = registry.configure(settings)
        champion = registry.version_by_alias(client, settings.model_name, registry.CHAMPION)
        if champion is None:
            return MonitorOutcome("no_champion", f"{len(log):,} predictions but no champion to compare them with",
                                  len(log), skew=found)
        profile = reference_profile(settings, spec, client, champion)
        report = check_traffic(settings, spec, thresholds, log, profile, client, champion, since, context_root)
        report.quarantined = read.quarantined + report.quarantined
        report.unlogged, report.skew = unlogged, found
        decision, run_id = _decide_and_trigger(report, thresholds, state, trigger, retrains.ledger_path(settings))
    return MonitorOutcome("triggered" if decision.fire else "checked", decision.summary(), report.rows,
                          report, decision, run_id, skew=found)


def _on_spec(settings: Settings, spec: DatasetSpec):
    """Whether a model version was trained on this spec (its `spec_hash` tag; a version from before
    the tag, or one the registry no longer has, counts as this spec's)."""
    own, client = spec_hash(spec), None

    def check(version: str) -> bool:
        nonlocal client
        client = client or registry.configure(settings)
        try:
            tag = client.get_model_version(settings.model_name, version).tags.get("spec_hash")
        except mlflow.exceptions.MlflowException:
            return True
        return tag in (None, own)

    return check


def _unlogged(settings: Settings, state: mon.MonitorState) -> int:
    """Rows the server could not log since the last run (counted once: the state keeps a watermark)."""
    now = pd.Timestamp.now(tz="UTC")
    after = pd.Timestamp(state.unlogged_until) if state.unlogged_until else None
    state.unlogged_until = str(now)
    return mon.unlogged_rows(settings.paths.predictions, after, now)


def _nothing_logged(since: pd.Timestamp | None, unlogged: int, quarantined: list[str]) -> MonitorOutcome:
    """"No traffic" only when there was none: rows answered but not logged are said, and counted."""
    unread = f"; {len(quarantined)} unreadable file(s) quarantined" if quarantined else ""
    if unlogged:
        return MonitorOutcome("unlogged", f"no row logged since {since or 'the start of the log'}, but "
                              f"{unlogged:,} rows the server answered could not be logged (its dead-letter "
                              f"folder){unread}", 0, quarantined=quarantined, unlogged=unlogged)
    return MonitorOutcome("no_traffic", f"no traffic since {since or 'the start of the log'}: "
                          f"nothing to monitor{unread}", 0, quarantined=quarantined)


def _decide_and_trigger(report: mon.DriftReport, thresholds: DriftThresholds, state: mon.MonitorState,
                        trigger: Trigger | None, retrain_ledger: Path) -> tuple[mon.TriggerDecision, str | None]:
    """Fire the retrain when warranted, unless triggering is off, the deployment is missing, or the last
    `max_blocked_retrains` retrains were all blocked by gates (the retrain ledger, `operate.retrains`):
    more of the same would be too."""
    now = datetime.now(UTC)
    active = trigger.active_runs() if trigger is not None else 0
    decision = mon.decide_trigger(report, thresholds, state, now, active_runs=active or 0)
    if not decision.fire:
        return decision, None
    if trigger is None:
        decision.fire, decision.suppressed = False, "triggering is off for this run (trigger=false)"
        return decision, None
    if active is None:
        decision.fire = False
        decision.suppressed = f"deployment {trigger.name!r} is not registered (run `make up`)"
        return decision, None
    if thresholds.max_blocked_retrains:
        try:
            streak = retrains.blocked_streak(retrain_ledger)
        except retrains.RetrainLedgerError as exc:
            decision.fire, decision.suppressed = False, str(exc)
            return decision, None
        if streak.count >= thresholds.max_blocked_retrains:
            last = streak.last_reason or "no reason recorded"
            last = last if len(last) <= 300 else last[:297] + "..."
            decision.fire = False
            decision.suppressed = (f"{streak.count} retrains in a row were blocked by gates (last: {last}); "
                                   f"{retrains.RESET_HINT}")
            return decision, None
    run_id = trigger.fire(decision)
    mon.record_trigger(state, decision, now, run_id)
    return decision, run_id


def record_report(settings: Settings, report: mon.DriftReport, decision: mon.TriggerDecision,
                  thresholds: DriftThresholds) -> str:
    """The report as an MLflow run with its plot; returns the run id."""
    registry.configure(settings)
    plot = mon.plot_drift(report, thresholds, settings.paths.monitoring / "drift.png")
    with mlflow.start_run(run_name="monitor", tags={"kind": "monitor",
                                                      "reference_version": report.reference_version,
                                                      "decision": decision.summary()[:4900]}) as run:
        mlflow.log_metrics({f"psi_{c['column']}": c["psi"] for c in report.table()} | {"rows": report.rows})
        if report.live is not None and report.live.recall is not None:
            mlflow.log_metrics({"live_recall": report.live.recall, "live_precision": report.live.precision or 0.0})
        estimate = report.estimate
        if estimate is not None and estimate.recall is not None:
            mlflow.log_metrics({"estimated_recall": estimate.recall, "estimated_precision": estimate.precision or 0.0})
        mlflow.log_dict(report.to_dict(), "drift_report.json")
        mlflow.log_text(report.to_markdown(decision), "drift_report.md")
        mlflow.log_artifact(str(plot))
    return run.info.run_id
