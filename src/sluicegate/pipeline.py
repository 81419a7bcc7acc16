"""The pipeline's stages as plain functions: each takes values, returns a result
with a one-line summary. `flows/pipeline.py` wires them into a Prefect flow.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sluicegate import data, evaluation, export, features, gates, validation
from sluicegate.benchmark import measure
from sluicegate.config import Settings
from sluicegate.export import Parity
from sluicegate.inputs import ModelInput, build_model_input, cardinalities
from sluicegate.spec import DatasetSpec
from sluicegate.training import TrainConfig, TrainResult, predict, train_model

SPLITS = (0.70, 0.85)  # time quantiles ending train and validation; the rest is test


class NoBatchError(FileNotFoundError):
    """There is no raw batch to run on."""


# --- batches -------------------------------------------------------------------------------------

def find_batch(settings: Settings, batch_id: str | None) -> Path:
    """The named raw batch, or the newest one."""
    raw = settings.paths.raw
    if batch_id:
        path = raw / batch_id
        if not path.is_dir():
            quarantined = settings.paths.quarantine / batch_id
            where = f" (it is in quarantine at {quarantined})" if quarantined.exists() else ""
            raise NoBatchError(f"no raw batch {batch_id!r} under {raw}{where}")
        return path
    batches = [p for p in raw.iterdir() if p.is_dir()] if raw.exists() else []
    if not batches:
        raise NoBatchError(f"no raw batch under {raw}: run `sluicegate generate` first")
    return max(batches, key=lambda p: p.stat().st_mtime)


def batch_window(batch_dir: Path) -> tuple[pd.Timestamp, pd.Timestamp]:
    """[first day, last day + 1) from the batch's date=YYYY-MM-DD partitions."""
    days = sorted(p.name.removeprefix("date=") for p in batch_dir.glob("date=*"))
    if not days:
        raise NoBatchError(f"{batch_dir} has no date=YYYY-MM-DD partitions")
    start = pd.Timestamp(days[0], tz="UTC")
    return start, pd.Timestamp(days[-1], tz="UTC") + pd.Timedelta(days=1)


# --- validation ----------------------------------------------------------------------------------

@dataclass
class ValidationOutcome:
    report: validation.ValidationReport
    batch_dir: Path
    quarantined_to: Path | None = None
    report_paths: tuple[Path, Path] | None = None

    @property
    def passed(self) -> bool:
        return self.report.success

    def summary(self) -> str:
        return self.report.summary(self.quarantined_to)


def validate_stage(settings: Settings, spec: DatasetSpec, batch_dir: Path,
                   context_root: Path) -> tuple[ValidationOutcome, pd.DataFrame | None]:
    """Validate a raw batch; on failure move it to quarantine with its report."""
    frame = data.read_batch(batch_dir)
    start, end = batch_window(batch_dir)
    report = validation.validate_batch(frame, spec, batch_dir.name, start, end, context_root=context_root)
    if report.success:
        return ValidationOutcome(report, batch_dir), frame
    target = data.quarantine_batch(batch_dir, settings.paths.quarantine)
    paths = validation.write_report(report, target)
    return ValidationOutcome(report, batch_dir, quarantined_to=target, report_paths=paths), None


# --- features ------------------------------------------------------------------------------------

@dataclass
class FeatureOutcome:
    frame: pd.DataFrame
    data_hash: str
    rows: int
    customer_rows: int
    merchant_rows: int
    seconds: float

    def summary(self) -> str:
        return (f"features: {self.customer_rows:,} customer and {self.merchant_rows:,} merchant rows "
                f"materialized; training set of {self.rows:,} rows (hash {self.data_hash[:12]}) "
                f"in {self.seconds:.1f}s")


def feature_stage(settings: Settings, spec: DatasetSpec, transactions: pd.DataFrame) -> FeatureOutcome:
    """Transform, register with Feast, materialize online, build the point-in-time training set."""
    started = time.perf_counter()
    customer, merchant = features.compute_feature_tables(transactions, spec)
    features.write_feature_tables(customer, merchant, settings.paths.features)
    store = features.feature_store(settings)
    features.apply_definitions(store, settings)
    end = pd.to_datetime(transactions[spec.timestamp], utc=True).max() + pd.Timedelta(seconds=1)
    features.materialize(store, end.to_pydatetime())
    frame = features.training_frame(store, transactions, spec)
    return FeatureOutcome(frame=frame, data_hash=features.frame_hash(frame), rows=len(frame),
                          customer_rows=len(customer), merchant_rows=len(merchant),
                          seconds=time.perf_counter() - started)


def fingerprint(data_hash: str, cfg: TrainConfig, spec: DatasetSpec) -> str:
    """Identity of a training run's inputs: same data, same config, same spec."""
    payload = json.dumps({"data": data_hash, "config": asdict(cfg), "spec": spec.model_dump()},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


# --- splits and training -------------------------------------------------------------------------

@dataclass
class Splits:
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame

    def window(self, name: str, spec: DatasetSpec) -> str:
        ts = getattr(self, name)[spec.timestamp]
        return f"{ts.min():%Y-%m-%d %H:%M} .. {ts.max():%Y-%m-%d %H:%M}"


def time_split(frame: pd.DataFrame, spec: DatasetSpec) -> Splits:
    """Train on the oldest 70% of time, validate on the next 15%, test on the newest."""
    ts = pd.to_datetime(frame[spec.timestamp], utc=True)
    cut_valid, cut_test = ts.quantile(SPLITS[0]), ts.quantile(SPLITS[1])
    train, valid, test = frame[ts < cut_valid], frame[(ts >= cut_valid) & (ts < cut_test)], frame[ts >= cut_test]
    for name, part in (("train", train), ("validation", valid), ("test", test)):
        if part[spec.label].nunique() < 2:
            raise ValueError(f"the {name} window has only one label class; the batch is too small")
    return Splits(train.reset_index(drop=True), valid.reset_index(drop=True), test.reset_index(drop=True))


@dataclass
class Prepared:
    splits: Splits
    train: ModelInput
    valid: ModelInput
    test: ModelInput
    y_train: np.ndarray
    y_valid: np.ndarray
    y_test: np.ndarray


def prepare(frame: pd.DataFrame, spec: DatasetSpec) -> Prepared:
    splits = time_split(frame, spec)
    label = spec.label
    return Prepared(
        splits=splits,
        train=build_model_input(splits.train, spec), valid=build_model_input(splits.valid, spec),
        test=build_model_input(splits.test, spec),
        y_train=splits.train[label].to_numpy(np.float32), y_valid=splits.valid[label].to_numpy(np.float32),
        y_test=splits.test[label].to_numpy(np.float32),
    )


def train_stage(prepared: Prepared, spec: DatasetSpec, cfg: TrainConfig, checkpoint_dir: Path,
                on_epoch=None) -> TrainResult:
    return train_model(prepared.train, prepared.y_train, prepared.valid, prepared.y_valid,
                       cardinalities(spec), cfg, checkpoint_dir, on_epoch=on_epoch)


# --- export --------------------------------------------------------------------------------------

@dataclass
class ExportOutcome:
    variants: dict[str, Path]  # variant name -> ONNX file; "fp32" always present
    parity: Parity

    @property
    def fp32(self) -> Path:
        return self.variants["fp32"]

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {path.stat().st_size / 1024:.0f} KiB" for name, path in self.variants.items())
        return (f"export: opset {export.OPSET}, {sizes}; fp32 parity max |diff| "
                f"{self.parity.max_abs_diff:.2e} over {self.parity.rows} golden rows "
                f"(tolerance {self.parity.tolerance:.0e}): {'ok' if self.parity.passed else 'FAILED'}")


def export_stage(model, prepared: Prepared, out_dir: Path, policy: gates.GatePolicy) -> ExportOutcome:
    """Export fp32 and check parity on a golden batch, then quantize to int8."""
    fp32 = export.export_onnx(model, prepared.train, out_dir / "model_fp32.onnx")
    golden = export.golden_batch(prepared.test)
    parity = export.check_parity(predict(model, golden.numeric, golden.categorical),
                                 export.onnx_predict(export.make_session(fp32), golden),
                                 policy.parity_tolerance)
    if not parity.passed:
        raise export.ParityError(
            f"fp32 ONNX differs from torch by {parity.max_abs_diff:.3e} on the golden batch "
            f"(tolerance {policy.parity_tolerance:.0e}); the export is wrong, nothing is registered")
    int8 = export.quantize_int8(fp32, out_dir / "model_int8.onnx")
    return ExportOutcome(variants={"fp32": fp32, "int8": int8}, parity=parity)


# --- evaluation ----------------------------------------------------------------------------------

@dataclass
class EvaluationOutcome:
    threshold: float
    torch_metrics: dict
    slices: list[dict]
    reliability: list[dict]
    variants: list[gates.VariantReport]
    shipped: gates.VariantReport
    seconds: float = 0.0
    shipped_metrics: dict = field(default_factory=dict)

    def summary(self) -> str:
        v = self.shipped
        return (f"evaluate: torch PR-AUC {self.torch_metrics['pr_auc']:.4f}, ROC-AUC "
                f"{self.torch_metrics['roc_auc']:.4f}; shipping {v.name} (PR-AUC {v.pr_auc:.4f}, "
                f"drop {v.pr_auc_drop:+.4f}, p50 {v.p50_ms_batch1:.3f} ms, p99 {v.p99_ms_batch1:.3f} ms, "
                f"{v.rows_per_s:,.0f} rows/s at batch 1024)")


def evaluate_stage(model, prepared: Prepared, exported: ExportOutcome, spec: DatasetSpec,
                   policy: gates.GatePolicy, bench_threads: int = 1) -> EvaluationOutcome:
    """Score torch and each ONNX variant on the test window; pick the variant to ship."""
    started = time.perf_counter()
    y = prepared.y_test
    threshold = evaluation.choose_threshold(
        prepared.y_valid, predict(model, prepared.valid.numeric, prepared.valid.categorical))
    torch_scores = predict(model, prepared.test.numeric, prepared.test.categorical)
    torch_metrics = evaluation.classification_metrics(y, torch_scores, threshold)
    golden = export.golden_batch(prepared.test)
    golden_torch = predict(model, golden.numeric, golden.categorical)
    variants, variant_metrics = [], {}
    for name, path in exported.variants.items():
        scores = export.onnx_predict(export.make_session(path), prepared.test)
        metrics = evaluation.classification_metrics(y, scores, threshold)
        latency = measure(export.make_session(path, threads=bench_threads), golden)
        diff = export.check_parity(golden_torch, export.onnx_predict(export.make_session(path), golden),
                                   policy.parity_tolerance).max_abs_diff
        variants.append(gates.VariantReport(
            name=name, path=str(path), pr_auc=metrics["pr_auc"], roc_auc=metrics["roc_auc"],
            ece=metrics["ece"], pr_auc_drop=torch_metrics["pr_auc"] - metrics["pr_auc"],
            max_abs_diff=diff, size_bytes=path.stat().st_size, p50_ms_batch1=latency.p50_ms_batch1,
            p99_ms_batch1=latency.p99_ms_batch1, rows_per_s=latency.rows_per_s))
        variant_metrics[name] = metrics
    shipped = gates.select_variant(variants, policy)
    shipped_scores = export.onnx_predict(export.make_session(Path(shipped.path)), prepared.test)
    return EvaluationOutcome(
        threshold=threshold, torch_metrics=torch_metrics,
        slices=evaluation.slice_metrics(prepared.splits.test, y, shipped_scores, threshold, spec),
        reliability=evaluation.reliability_table(y, shipped_scores),
        variants=variants, shipped=shipped, seconds=time.perf_counter() - started,
        shipped_metrics=variant_metrics[shipped.name])


def champion_pr_auc(champion_onnx: Path, prepared: Prepared) -> float:
    """The current champion scored on the candidate's own test window."""
    scores = export.onnx_predict(export.make_session(champion_onnx), prepared.test)
    return evaluation.classification_metrics(prepared.y_test, scores, 0.5)["pr_auc"]
