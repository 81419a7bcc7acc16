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

from sluicegate import runtime
from sluicegate.config import Settings
from sluicegate.data import batches as data
from sluicegate.data import validate as validation
from sluicegate.features import catalog
from sluicegate.features import store as features
from sluicegate.features.inputs import NUMERIC_INPUTS, ModelInput, build_model_input, cardinalities
from sluicegate.hardware import Hardware
from sluicegate.policy import GatePolicy
from sluicegate.ship import benchmark, export, gates
from sluicegate.ship import evaluate as evaluation
from sluicegate.ship.benchmark import BenchConfig, VariantBenchmark
from sluicegate.ship.export import Parity
from sluicegate.spec import DatasetSpec
from sluicegate.train import ddp
from sluicegate.train.config import TrainConfig
from sluicegate.train.loop import TrainResult, predict, train_distilled, train_model

SPLITS = (0.70, 0.85)  # time quantiles ending train and validation; the rest is test


class NoBatchError(FileNotFoundError):
    """There is no raw batch to run on."""


# --- batches -------------------------------------------------------------------------------------

def find_batch(settings: Settings, batch_id: str | None) -> Path:
    """The named raw batch, or the newest one."""
    raw = settings.paths.raw
    if batch_id:
        if batch_id != Path(batch_id).name or batch_id in (".", ".."):  # a name, never a path out of raw/
            raise NoBatchError(f"batch id {batch_id!r} is not a plain folder name under {raw}")
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
    quarantined_to: Path | None = None

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
        return ValidationOutcome(report), frame
    target = data.quarantine_batch(batch_dir, settings.paths.quarantine)
    validation.write_report(report, target)
    return ValidationOutcome(report, quarantined_to=target), None


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


def fingerprint(data_hash: str, cfg: TrainConfig, spec: DatasetSpec, target: str = "cpu") -> str:
    """Identity of a training run's inputs: same data, config, spec and target hardware."""
    payload = json.dumps({"data": data_hash, "config": cfg.model_dump(), "spec": spec.model_dump(), "target": target},
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
    """Train in this process, or under torchrun when more than one device is to be used;
    with `cfg.distill`, an FT-Transformer teacher and then the MLP student that ships."""
    fit = ddp.launch if ddp.world_size(cfg) > 1 else train_model
    args = (prepared.train, prepared.y_train, prepared.valid, prepared.y_valid, cardinalities(spec), cfg,
            checkpoint_dir)
    if cfg.distill:
        return train_distilled(*args, on_epoch=on_epoch, fit=fit)
    return fit(*args, on_epoch=on_epoch)


# --- export --------------------------------------------------------------------------------------

@dataclass
class ExportOutcome:
    variants: dict[str, Path]  # variant name -> ONNX file; "fp32" always present
    parity: Parity  # fp32 against torch; a failure stops the run
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # each variant against torch, golden batch
    providers: dict[str, list[str]] = field(default_factory=dict)  # execution providers each variant is for

    def runnable(self, providers: list[str] | None = None) -> dict[str, Path]:
        """The variants meant for one of these (default: the present) execution providers."""
        return {name: path for name, path in self.variants.items() if runtime.runnable_providers(name, providers)}

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {path.stat().st_size / 1024:.0f} KiB (|diff| {self.max_abs_diff.get(name, 0):.1e})"
                          for name, path in self.variants.items())
        return (f"export: opset {export.OPSET}, {sizes}; fp32 parity max |diff| "
                f"{self.parity.max_abs_diff:.2e} over {self.parity.rows} golden rows "
                f"(tolerance {self.parity.tolerance:.0e}): {'ok' if self.parity.passed else 'FAILED'}")


def export_stage(model, prepared: Prepared, out_dir: Path, policy: GatePolicy) -> ExportOutcome:
    """Export every variant; fp32 must match torch on the golden batch (test rows), and static
    int8 is calibrated on rows of the feature-store training set."""
    variants = export.export_variants(model, prepared.train, export.calibration_sample(prepared.train), out_dir)
    golden = export.golden_batch(prepared.test)
    reference = predict(model, golden.numeric, golden.categorical)
    cpu = ["CPUExecutionProvider"]  # parity is about the graph, so every variant is checked on one provider
    diffs = {name: export.check_parity(reference, runtime.onnx_predict(runtime.make_session(path, providers=cpu),
                                                                      golden), policy.parity_tolerance)
             for name, path in variants.items()}
    parity = diffs["fp32"]
    if not parity.passed:
        raise export.ParityError(
            f"fp32 ONNX differs from torch by {parity.max_abs_diff:.3e} on the golden batch "
            f"(tolerance {policy.parity_tolerance:.0e}); the export is wrong, nothing is registered")
    return ExportOutcome(variants=variants, parity=parity,
                         max_abs_diff={name: p.max_abs_diff for name, p in diffs.items()},
                         providers={name: list(runtime.VARIANT_PROVIDERS[name]) for name in variants})


# --- evaluation ----------------------------------------------------------------------------------

@dataclass
class EvaluationOutcome:
    threshold: float
    torch_metrics: dict
    shipped_metrics: dict
    slices: list[dict]
    reliability: list[dict]
    robustness: evaluation.Robustness
    behaviour: evaluation.Behaviour
    variants: list[gates.VariantReport]
    shipped: gates.VariantReport
    benchmark: list[dict]  # one row per variant and scenario, with its cost per 1M predictions
    holdout: pd.DataFrame
    hardware: Hardware
    seconds: float = 0.0

    def summary(self) -> str:
        v = self.shipped
        return (f"evaluate: torch PR-AUC {self.torch_metrics['pr_auc']:.4f}, ROC-AUC "
                f"{self.torch_metrics['roc_auc']:.4f}; shipping {v.name} for {self.hardware.target} "
                f"(PR-AUC {v.pr_auc:.4f}, drop {v.pr_auc_drop:+.4f}; SingleStream p90 {v.p90_ms_batch1:.3f} ms, "
                f"Server p99 {v.server_p99_ms:.3f} ms, Offline {v.rows_per_s:,.0f} rows/s, "
                f"${v.cost_per_million:.3g} per 1M) in {self.seconds:.1f}s")



def benchmark_rows(benches: list[VariantBenchmark], price_per_hour: float) -> list[dict]:
    """Every scenario of every variant as a table row, with its cost per 1M predictions."""
    return [{**s.to_dict(), "model_bytes": bench.model_bytes, "memory_mb": round(bench.memory_mb, 2),
             "cost_per_million": benchmark.cost_per_million(s.samples_per_s, price_per_hour)}
            for bench in benches for s in bench.scenarios]


def evaluate_stage(model, prepared: Prepared, exported: ExportOutcome, spec: DatasetSpec,
                   policy: GatePolicy, hw: Hardware, bench: BenchConfig | None = None) -> EvaluationOutcome:
    """Score torch and every ONNX variant on the test window, benchmark them on the
    target's execution provider, and pick the variant to ship."""
    started = time.perf_counter()
    bench = bench or BenchConfig(server_qps=policy.slo_target_qps)
    y = prepared.y_test
    threshold = evaluation.choose_threshold(
        prepared.y_valid, predict(model, prepared.valid.numeric, prepared.valid.categorical))
    torch_metrics = evaluation.classification_metrics(
        y, predict(model, prepared.test.numeric, prepared.test.categorical), threshold)
    golden = export.golden_batch(prepared.test)
    variants, benches, metrics_by_name, sessions = [], [], {}, {}
    for name, path in exported.runnable([hw.provider]).items():
        sessions[name] = runtime.make_session(path, providers=[hw.provider])
        metrics = evaluation.classification_metrics(y, runtime.onnx_predict(sessions[name], prepared.test), threshold)
        result = benchmark.benchmark_variant(name, path, golden, bench, hw.provider)
        benches.append(result)
        metrics_by_name[name] = metrics
        variants.append(_variant_report(name, path, hw, metrics, torch_metrics, exported.max_abs_diff[name], result))
    shipped = gates.select_variant(variants, policy)
    shipped_session = sessions[shipped.name]

    def score(data: ModelInput) -> np.ndarray:
        return runtime.onnx_predict(shipped_session, data)

    shipped_scores = score(prepared.test)
    groups = evaluation.slice_groups(prepared.splits.test, prepared.test, spec)
    return EvaluationOutcome(
        threshold=threshold, torch_metrics=torch_metrics, shipped_metrics=metrics_by_name[shipped.name],
        slices=evaluation.slice_metrics(groups, y, shipped_scores, threshold),
        reliability=evaluation.reliability_table(y, shipped_scores),
        robustness=evaluation.robustness(score, prepared.test, y, metrics_by_name[shipped.name]["pr_auc"], spec),
        behaviour=evaluation.behaviour(score, prepared.test),
        variants=variants, benchmark=benchmark_rows(benches, hw.price_per_hour), shipped=shipped,
        holdout=holdout_frame(prepared.test, y, groups, spec), hardware=hw,
        seconds=time.perf_counter() - started)


def _variant_report(name, path, hw: Hardware, metrics, torch_metrics, max_abs_diff, result) -> gates.VariantReport:
    single, server, offline = (result.scenario(s) for s in ("SingleStream", "Server", "Offline"))
    return gates.VariantReport(
        name=name, path=str(path), provider=hw.provider, pr_auc=metrics["pr_auc"], roc_auc=metrics["roc_auc"],
        ece=metrics["ece"], pr_auc_drop=torch_metrics["pr_auc"] - metrics["pr_auc"],
        roc_auc_drop=torch_metrics["roc_auc"] - metrics["roc_auc"], max_abs_diff=max_abs_diff,
        size_bytes=Path(path).stat().st_size, p50_ms_batch1=single.p50_ms, p90_ms_batch1=single.p90_ms,
        p99_ms_batch1=single.p99_ms, server_p99_ms=server.p99_ms, rows_per_s=offline.samples_per_s,
        memory_mb=result.memory_mb,
        cost_per_million=benchmark.cost_per_million(offline.samples_per_s, hw.price_per_hour))


# --- the held-out window, kept with the version for later comparisons -----------------------------

SLICE_PREFIX = "slice:"
CAT_PREFIX = "cat:"


def holdout_frame(inputs: ModelInput, y: np.ndarray, groups: dict[str, np.ndarray],
                  spec: DatasetSpec) -> pd.DataFrame:
    """Model inputs, labels and slice values of the test window, as one table."""
    frame = pd.DataFrame(inputs.numeric, columns=NUMERIC_INPUTS)
    for i, name in enumerate(spec.categorical_features):
        frame[CAT_PREFIX + name] = inputs.categorical[:, i]
    frame[spec.label] = y
    for name, values in groups.items():
        frame[SLICE_PREFIX + name] = values
    return frame


def read_holdout(frame: pd.DataFrame, spec: DatasetSpec) -> tuple[ModelInput, np.ndarray, dict[str, np.ndarray]]:
    inputs = ModelInput(frame[NUMERIC_INPUTS].to_numpy(np.float32),
                        frame[[CAT_PREFIX + c for c in spec.categorical_features]].to_numpy(np.int64))
    groups = {c.removeprefix(SLICE_PREFIX): frame[c].to_numpy() for c in frame.columns if c.startswith(SLICE_PREFIX)}
    return inputs, frame[spec.label].to_numpy(np.float64), groups


def compare_on_holdout(champion_onnx: Path, challenger_onnx: Path, holdout: pd.DataFrame, spec: DatasetSpec,
                       policy: GatePolicy) -> list[evaluation.Comparison]:
    """Both models scored on the challenger's held-out rows; overall and per-slice paired bootstrap."""
    inputs, y, groups = read_holdout(holdout, spec)
    champion = runtime.onnx_predict(runtime.make_session(champion_onnx), inputs)
    challenger = runtime.onnx_predict(runtime.make_session(challenger_onnx), inputs)
    return evaluation.compare_models(y, champion, challenger, groups, policy.bootstrap_samples, policy.confidence,
                                     policy.min_slice_support, policy.min_slice_positives)


def write_evidence(evaluated: EvaluationOutcome, exported: ExportOutcome, out_dir: Path,
                   extra: dict | None = None) -> Path:
    """Everything the gates and the model card need, as files to attach to the version."""
    out_dir.mkdir(parents=True, exist_ok=True)
    evidence = {
        "shipped": asdict(evaluated.shipped), "fp32_parity": exported.parity.max_abs_diff,
        "variants": [asdict(v) for v in evaluated.variants], "threshold": evaluated.threshold,
        "torch_metrics": evaluated.torch_metrics, "shipped_metrics": evaluated.shipped_metrics,
        "slices": evaluated.slices, "reliability": evaluated.reliability,
        "robustness": evaluated.robustness.to_dict(), "behaviour": evaluated.behaviour.to_dict(),
        "benchmark": evaluated.benchmark, "hardware": asdict(evaluated.hardware),
        "features": catalog.FEATURE_NAMES, **(extra or {}),
    }
    (out_dir / "evidence.json").write_text(json.dumps(evidence, indent=2, default=float))
    (out_dir / "benchmark.json").write_text(json.dumps(evaluated.benchmark, indent=2))
    evaluated.holdout.to_parquet(out_dir / "holdout.parquet", index=False)
    evaluation.plot_reliability(evaluated.reliability, evaluated.shipped_metrics["ece"], out_dir / "reliability.png")
    return out_dir
