"""The shipping phase's entry points up to a registered challenger: export, evaluate, evidence, register.

Gating, promotion and rollback are `ship.promote`'s (which loads no torch, for `make deploy`)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from sluicegate import runtime
from sluicegate.config import Settings
from sluicegate.features import catalog
from sluicegate.features.inputs import build_model_input
from sluicegate.hardware import Hardware
from sluicegate.policy import GatePolicy
from sluicegate.runtime import ModelInput
from sluicegate.ship import benchmark, export, gates, registry, serving_parity
from sluicegate.ship import evaluate as evaluation
from sluicegate.ship.benchmark import BenchConfig, VariantBenchmark
from sluicegate.ship.export import Parity
from sluicegate.ship.holdout import keep_holdout
from sluicegate.spec import DatasetSpec
from sluicegate.train import identity
from sluicegate.train.loop import predict
from sluicegate.train.stages import Prepared


@dataclass
class ExportOutcome:
    variants: dict[str, Path]  # variant name -> ONNX file; "fp32" always present
    parity: Parity  # fp32 against torch; a failure stops the run
    opset: int
    max_abs_diff: dict[str, float] = field(default_factory=dict)  # each variant against torch, golden batch
    providers: dict[str, list[str]] = field(default_factory=dict)  # execution providers each variant is for

    def runnable(self, providers: list[str] | None = None) -> dict[str, Path]:
        """The variants meant for one of these (default: the present) execution providers."""
        return {name: path for name, path in self.variants.items() if runtime.runnable_providers(name, providers)}

    def summary(self) -> str:
        sizes = ", ".join(f"{name} {path.stat().st_size / 1024:.0f} KiB (|diff| {self.max_abs_diff.get(name, 0):.1e})"
                          for name, path in self.variants.items())
        return (f"export: opset {self.opset}, {sizes}; fp32 parity max |diff| "
                f"{self.parity.max_abs_diff:.2e} over {self.parity.rows} golden rows "
                f"(tolerance {self.parity.tolerance:.0e}): {'ok' if self.parity.passed else 'FAILED'}")

    def metrics(self) -> dict[str, float]:
        return {"parity_max_abs_diff": self.parity.max_abs_diff,
                **{f"max_abs_diff_{name}": d for name, d in self.max_abs_diff.items()}}


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
    return ExportOutcome(variants=variants, parity=parity, opset=export.OPSET,
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
    features: list[str] = field(default_factory=list)  # the spec's feature columns
    dataset: dict = field(default_factory=dict)  # what the model card says of the table
    baselines: list[dict] = field(default_factory=list)  # each baseline's validation and test PR-AUC
    seconds: float = 0.0

    def summary(self) -> str:
        v = self.shipped
        return (f"evaluate: torch PR-AUC {self.torch_metrics['pr_auc']:.4f}, ROC-AUC "
                f"{self.torch_metrics['roc_auc']:.4f}; shipping {v.name} for {self.hardware.target} "
                f"on {v.provider}, {v.device} "
                f"(PR-AUC {v.pr_auc:.4f}, drop {v.pr_auc_drop:+.4f}; SingleStream p90 {v.p90_ms_batch1:.3f} ms, "
                f"Server p99 {v.server_p99_ms:.3f} ms, Offline {v.rows_per_s:,.0f} rows/s, "
                f"${v.cost_per_million:.3g} per 1M) in {self.seconds:.1f}s; baselines' test PR-AUC: "
                + (", ".join(f"{b['name']} {b['test_pr_auc']:.4f}" for b in self.baselines) or "none"))

    def tables(self) -> dict[str, list[dict]]:
        """The run's tables, for MLflow and Prefect artifacts."""
        return {"variants": [asdict(v) for v in self.variants], "slices": self.slices, "benchmark": self.benchmark}

    def key_metrics(self) -> dict[str, float]:
        """The shipped variant's headline numbers (on the pipeline's parent run, read by `sluicegate status`)."""
        shipped, metrics = self.shipped, self.shipped_metrics
        return {**{k: metrics[k] for k in ("pr_auc", "roc_auc", "ece", "precision", "recall", "f1")},
                "p50_ms_batch1": shipped.p50_ms_batch1, "p99_ms_batch1": shipped.p99_ms_batch1,
                "server_p99_ms": shipped.server_p99_ms, "rows_per_s": shipped.rows_per_s,
                "cost_per_million": shipped.cost_per_million, "threshold": self.threshold}



def benchmark_rows(benches: list[VariantBenchmark], price_per_hour: float) -> list[dict]:
    """Every scenario of every variant as a table row, with its cost per 1M predictions."""
    return [{**s.to_dict(), "model_bytes": bench.model_bytes, "memory_mb": round(bench.memory_mb, 2),
             "cost_per_million": benchmark.cost_per_million(s.samples_per_s, price_per_hour),
             "ran_on": bench.device, "onnxruntime": bench.onnxruntime}
            for bench in benches for s in bench.scenarios]


def evaluate_stage(model, prepared: Prepared, exported: ExportOutcome, spec: DatasetSpec,
                   policy: GatePolicy, hw: Hardware, bench: BenchConfig | None = None) -> EvaluationOutcome:
    """Score torch and every ONNX variant on the test window, benchmark them on the
    target's execution provider, and pick the variant to ship."""
    started = time.perf_counter()
    bench = bench or BenchConfig(server_qps=policy.slo_target_qps, server_latency_ms=policy.latency_slo_p99_ms)
    y = prepared.y_test
    threshold = evaluation.choose_threshold(
        prepared.y_valid, predict(model, prepared.valid.numeric, prepared.valid.categorical))
    torch_metrics = evaluation.classification_metrics(
        y, predict(model, prepared.test.numeric, prepared.test.categorical), threshold)
    golden = export.golden_batch(prepared.test)
    torch_valid = evaluation.average_precision(prepared.y_valid, predict(model, prepared.valid.numeric,
                                                                         prepared.valid.categorical))
    variants, benches, metrics_by_name = [], [], {}
    runnable = exported.runnable([hw.provider])
    for name, path in runnable.items():
        # One session at a time: each keeps the memory arena of its largest batch (about 0.3 GB).
        session = runtime.make_session(path, providers=hw.providers(name))  # on the target's provider or not at all
        metrics = evaluation.classification_metrics(y, runtime.onnx_predict(session, prepared.test), threshold)
        valid_drop = torch_valid - evaluation.average_precision(prepared.y_valid,
                                                                runtime.onnx_predict(session, prepared.valid))
        del session
        result = benchmark.benchmark_variant(name, path, golden, bench, hw.providers(name), hw.device)
        benches.append(result)
        metrics_by_name[name] = metrics
        variants.append(_variant_report(name, path, hw, metrics, torch_metrics, exported.max_abs_diff[name], result))
        variants[-1].valid_pr_auc_drop = valid_drop  # what picks the variant (gates.select_variant)
    shipped = gates.select_variant(variants, policy)
    shipped_session = runtime.make_session(runnable[shipped.name], providers=hw.providers(shipped.name))

    def score(data: ModelInput) -> np.ndarray:
        return runtime.onnx_predict(shipped_session, data)

    shipped_scores = score(prepared.test)
    test_rows = prepared.splits.rows("test")
    groups = evaluation.slice_groups(test_rows, prepared.test, spec)
    holdout, fitted = keep_holdout(prepared, spec, groups)
    return EvaluationOutcome(
        threshold=threshold, torch_metrics=torch_metrics, shipped_metrics=metrics_by_name[shipped.name],
        slices=evaluation.slice_metrics(groups, y, shipped_scores, threshold),
        reliability=evaluation.reliability_table(y, shipped_scores),
        robustness=evaluation.robustness(score, prepared.test, y, metrics_by_name[shipped.name]["pr_auc"], spec),
        behaviour=evaluation.behaviour(lambda f: score(build_model_input(f, spec)), test_rows, spec),
        variants=variants, benchmark=benchmark_rows(benches, hw.price_per_hour), shipped=shipped,
        holdout=holdout, baselines=fitted, hardware=hw, features=spec.feature_columns,
        dataset={"name": spec.name, "predicts": spec.predicts, "label": spec.label,
                 "positive": spec.table.positive, "spec_hash": identity.spec_hash(spec),
                 "model_spec": identity.model_spec(spec),
                 "spec": spec.model_dump(mode="json")},  # a later champion comparison builds this model's inputs
        seconds=time.perf_counter() - started)


def _variant_report(name, path, hw: Hardware, metrics, torch_metrics, max_abs_diff, result) -> gates.VariantReport:
    single, server, offline = (result.scenario(s) for s in ("SingleStream", "Server", "Offline"))
    return gates.VariantReport(
        name=name, path=str(path), provider=result.provider, pr_auc=metrics["pr_auc"], roc_auc=metrics["roc_auc"],
        ece=metrics["ece"], pr_auc_drop=torch_metrics["pr_auc"] - metrics["pr_auc"],
        roc_auc_drop=torch_metrics["roc_auc"] - metrics["roc_auc"], max_abs_diff=max_abs_diff,
        size_bytes=Path(path).stat().st_size, p50_ms_batch1=single.p50_ms, p90_ms_batch1=single.p90_ms,
        p99_ms_batch1=single.p99_ms, server_p99_ms=server.p99_ms, rows_per_s=offline.samples_per_s,
        memory_mb=result.memory_mb, server_verdict=_verdict(server),
        cost_per_million=benchmark.cost_per_million(offline.samples_per_s, hw.price_per_hour),
        device=result.device, onnxruntime=result.onnxruntime)

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
        "features": evaluated.features, "dataset": evaluated.dataset, "baselines": evaluated.baselines,
        **(extra or {}),
    }
    (out_dir / "evidence.json").write_text(json.dumps(evidence, indent=2, default=float))
    (out_dir / "benchmark.json").write_text(json.dumps(evaluated.benchmark, indent=2))
    evaluated.holdout.to_parquet(out_dir / "holdout.parquet", index=False)
    evaluation.plot_reliability(evaluated.reliability, evaluated.shipped_metrics["ece"], out_dir / "reliability.png")
    return out_dir


def _verdict(scenario) -> str:
    if scenario.validity is None:
        return "not measured"
    return scenario.validity + (f" ({scenario.invalid_reason})" if scenario.invalid_reason else "")


def serving_parity_stage(settings: Settings, spec: DatasetSpec, prepared: Prepared,
                         evaluated: EvaluationOutcome) -> serving_parity.ServingParity:
    """The shipped variant on the test window as the server would compute its features."""
    session = runtime.make_session(evaluated.shipped.path, providers=[evaluated.hardware.provider])
    return serving_parity.serving_parity_stage(settings, spec, prepared,
                                               lambda data: runtime.onnx_predict(session, data),
                                               settings.serving_parity_rows)


# --- register, gate, deploy, roll back --------------------------------------------------------------

def lineage_tags(batch_id: str, data_hash: str, fp: str, flow_run_id: str, target: str, prepared: Prepared,
                 spec: DatasetSpec, evaluated: EvaluationOutcome) -> dict[str, str]:
    """What a registered version records about where it came from (read by deploy, monitor and status)."""
    return {"batch_id": batch_id, "data_hash": data_hash, "fingerprint": fp,
            "feature_service": catalog.feature_service(spec),
            "git_commit": registry.git_commit(),
            "prefect_flow_run_id": flow_run_id, "target": target,
            "train_window": prepared.splits.window("train", spec),
            "test_window": prepared.splits.window("test", spec), "split": prepared.splits.method,
            "threshold": f"{evaluated.threshold:.6f}", "spec_hash": identity.spec_hash(spec)}


def unchanged(client: MlflowClient, model_name: str, fp: str) -> dict | None:
    """The pipeline's answer when training would be wasted (the champion saw this exact data and
    configuration), else None."""
    champion = registry.version_by_alias(client, model_name, registry.CHAMPION)
    if champion is None or champion.tags.get("fingerprint") != fp:
        return None
    return {"status": "unchanged", "version": str(champion.version),
            "reason": f"champion v{champion.version} was trained on this exact data, configuration and model spec; "
                      "nothing new to promote"}


def spec_change(client: MlflowClient, model_name: str, spec: DatasetSpec) -> str | None:
    """Why this run cannot build on the champion's training: its model spec differs; None when it does not."""
    champion = registry.version_by_alias(client, model_name, registry.CHAMPION)
    now = identity.spec_hash(spec)
    before = champion.tags.get("spec_hash") if champion is not None else None
    if champion is None or before == now:
        return None
    return (f"model spec {now} differs from champion v{champion.version}'s {before or '(not recorded)'}: "
            "no checkpoint of another model spec is resumed; the gate report lists what changed")


@dataclass
class RegisterOutcome:
    model_name: str
    version: ModelVersion
    variant: str

    def summary(self) -> str:
        return f"register: {self.model_name} v{self.version.version} ({self.variant}) registered as challenger"


def register_stage(client: MlflowClient, model_name: str, run_id: str, evaluated: EvaluationOutcome,
                   evidence_dir: Path, tags: dict[str, str]) -> RegisterOutcome:
    """Log the shipped ONNX and its evidence on the active run; a new version with alias challenger."""
    shipped = Path(evaluated.shipped.path)
    info = registry.log_onnx_model(shipped)
    mlflow.log_artifacts(str(evidence_dir), "evidence")
    version = registry.register_candidate(client, model_name, info, run_id, shipped,
                                          {**tags, "variant": evaluated.shipped.name})
    return RegisterOutcome(model_name, version, evaluated.shipped.name)
