"""training-pipeline: validate -> features -> train -> export -> evaluate -> gate -> register.

Each task calls one stage function from `sluicegate.pipeline` and logs its
one-line summary; the flow only decides what runs next.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from sluicegate import pipeline as stages
from sluicegate import registry
from sluicegate.config import Settings, ensure_home
from sluicegate.gates import Evidence, GatePolicy, decide, load_policy
from sluicegate.spec import DatasetSpec, load_spec
from sluicegate.training import TrainConfig


class PipelineParams(BaseModel):
    """What the Prefect UI shows as the run form."""

    batch: str | None = Field(None, description="Raw batch id under SLUICEGATE_HOME/raw; empty = newest")
    max_epochs: int = Field(20, ge=1, le=200, description="Upper bound on training epochs")
    patience: int = Field(3, ge=1, le=20, description="Epochs without validation gain before stopping")
    seed: int = Field(0, description="Training seed")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Training precision")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Training device")
    expectations: str = Field("expectations", description="Great Expectations context folder")
    actor: str = Field("pipeline", description="Who or what asked for this run, recorded on promotion")


@task(name="validate", cache_policy=NO_CACHE)
def validate(settings: Settings, spec: DatasetSpec, batch_dir: Path, context_root: Path, parent: str):
    with registry.stage_run(parent, "validate"):
        outcome, frame = stages.validate_stage(settings, spec, batch_dir, context_root)
        mlflow.log_metrics({"rows": outcome.report.row_count, "failed_checks": len(outcome.report.failures)})
        mlflow.log_dict(outcome.report.to_dict(), "validation_report.json")
    get_run_logger().info(outcome.summary())
    return outcome, frame


@task(name="features", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def build_features(settings: Settings, spec: DatasetSpec, frame, parent: str):
    with registry.stage_run(parent, "features"):
        outcome = stages.feature_stage(settings, spec, frame)
        mlflow.log_params({"data_hash": outcome.data_hash, "feature_service": "fraud_model_v1"})
        mlflow.log_metrics({"training_rows": outcome.rows, "customer_feature_rows": outcome.customer_rows,
                            "merchant_feature_rows": outcome.merchant_rows})
    get_run_logger().info(outcome.summary())
    return outcome


@task(name="train", cache_policy=NO_CACHE)
def train(prepared, spec: DatasetSpec, cfg: TrainConfig, checkpoint_dir: Path, parent: str):
    logger = get_run_logger()
    with registry.stage_run(parent, "train"):
        mlflow.log_params({f"train.{k}": v for k, v in cfg.__dict__.items()})
        result = stages.train_stage(
            prepared, spec, cfg, checkpoint_dir,
            on_epoch=lambda row: (mlflow.log_metrics(row, step=row["epoch"]),
                                  logger.info("epoch %(epoch)d: loss %(train_loss).4f, "
                                              "valid PR-AUC %(valid_pr_auc).4f", row)))
        mlflow.log_dict(result.device, "hardware.json")
        mlflow.set_tags({f"hw.{k}": v for k, v in result.device.items()})
    logger.info(f"train: best epoch {result.best_epoch} of {result.epochs_run}, valid PR-AUC "
                f"{result.best_valid_pr_auc:.4f} on {result.device['device_type']} "
                f"({result.device['precision']}) in {result.seconds:.1f}s")
    return result


@task(name="export", cache_policy=NO_CACHE)
def export_model(model, prepared, out_dir: Path, policy: GatePolicy, parent: str):
    with registry.stage_run(parent, "export"):
        outcome = stages.export_stage(model, prepared, out_dir, policy)
        mlflow.log_metrics({"parity_max_abs_diff": outcome.parity.max_abs_diff})
    get_run_logger().info(outcome.summary())
    return outcome


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(model, prepared, exported, spec: DatasetSpec, policy: GatePolicy, parent: str):
    with registry.stage_run(parent, "evaluate"):
        outcome = stages.evaluate_stage(model, prepared, exported, spec, policy)
        mlflow.log_metrics({f"torch_{k}": v for k, v in outcome.torch_metrics.items()})
        mlflow.log_table({k: [getattr(v, k) for v in outcome.variants] for k in outcome.variants[0].__dict__},
                         "variants.json")
        mlflow.log_table({k: [r[k] for r in outcome.slices] for k in outcome.slices[0]}, "slices.json")
        mlflow.log_dict(outcome.reliability, "reliability.json")
    create_table_artifact(key="variants", table=[v.__dict__ for v in outcome.variants],
                          description="Each ONNX variant on the test window")
    get_run_logger().info(outcome.summary())
    return outcome


@task(name="gate", cache_policy=NO_CACHE)
def gate(settings: Settings, policy: GatePolicy, prepared, evaluated, exported, work_dir: Path):
    client = registry.configure(settings)
    champion = registry.version_by_alias(client, settings.model_name, registry.CHAMPION)
    champion_auc = None
    if champion is not None:
        onnx_path = registry.download_onnx(client, champion, work_dir / f"champion-v{champion.version}")
        champion_auc = stages.champion_pr_auc(onnx_path, prepared)
    evidence = Evidence(shipped=evaluated.shipped, fp32_parity=exported.parity.max_abs_diff,
                        champion_version=champion.version if champion else None,
                        champion_pr_auc=champion_auc)
    decision = decide(policy, evidence)
    get_run_logger().info(f"gate: {'PROMOTE' if decision.promote else 'BLOCK'}: {decision.reason()}")
    return decision


@task(name="register", retries=3, retry_delay_seconds=[2, 5, 15], cache_policy=NO_CACHE)
def register(settings: Settings, parent: str, evaluated, decision, tags: dict, actor: str) -> dict:
    client = registry.configure(settings)
    shipped = Path(evaluated.shipped.path)
    with registry.stage_run(parent, "register") as run:
        info = registry.log_onnx_model(shipped)
        mlflow.log_text(decision.to_markdown(), "gate_report.md")
        mlflow.log_dict(decision.to_dict(), "gate_report.json")
        version = registry.register_candidate(client, settings.model_name, info, run.info.run_id, shipped,
                                              {**tags, "variant": evaluated.shipped.name})
    registry.record_decision(client, settings.model_name, version.version, decision.to_dict())
    previous = None
    if decision.promote:
        previous = registry.promote(client, settings.model_name, version.version, decision.reason(), actor)
    verb = "promoted to champion" if decision.promote else "registered as challenger, not promoted"
    get_run_logger().info(f"register: {settings.model_name} v{version.version} ({evaluated.shipped.name}) {verb}")
    return {"version": version.version, "previous_champion": previous}


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(params: PipelineParams | None = None) -> dict:
    """Run one raw batch through every gate; returns what happened and why."""
    params = params or PipelineParams()
    settings = Settings()
    policy = load_policy(settings.gates_path)  # a broken policy fails before any work
    spec = load_spec(settings.spec_path)
    ensure_home(settings.paths)
    client = registry.configure(settings)
    batch_dir = stages.find_batch(settings, params.batch)
    cfg = TrainConfig(max_epochs=params.max_epochs, patience=params.patience, seed=params.seed,
                      precision=params.precision, device=params.device)
    run_id = flow_run.id or "local"
    work_dir = settings.paths.runs / f"{batch_dir.name}-{str(run_id)[:8]}"
    parent = mlflow.start_run(run_name=f"pipeline {batch_dir.name}",
                              tags={"batch_id": batch_dir.name, "prefect_flow_run_id": str(run_id)}).info.run_id
    mlflow.end_run()
    status = "FAILED"
    try:
        result = _run_stages(settings, spec, policy, params, cfg, batch_dir, work_dir, parent, client)
        status = "FINISHED"
        return result
    finally:
        client.set_terminated(parent, status)


class _Stopwatch:
    """Seconds per stage, for the run summary."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 2)
        self._last = now


def _run_stages(settings, spec, policy, params, cfg, batch_dir, work_dir, parent, client) -> dict:
    clock = _Stopwatch()
    base = {"batch": batch_dir.name, "mlflow_run_id": parent, "work_dir": str(work_dir),
            "stage_seconds": clock.seconds}
    validated, frame = validate(settings, spec, batch_dir, Path(params.expectations), parent)
    clock.lap("validate")
    if not validated.passed:
        create_markdown_artifact(key="validation-report", markdown=validated.report.to_markdown(),
                                 description=f"Batch {batch_dir.name} quarantined")
        return {**base, "status": "blocked_data", "reason": validated.summary(),
                "quarantined_to": str(validated.quarantined_to)}
    feats = build_features(settings, spec, frame, parent)
    clock.lap("features")
    fp = stages.fingerprint(feats.data_hash, cfg, spec)
    champion = registry.version_by_alias(client, settings.model_name, registry.CHAMPION)
    if champion is not None and champion.tags.get("fingerprint") == fp:
        reason = (f"champion v{champion.version} was trained on this exact data and configuration; "
                  "nothing new to promote")
        get_run_logger().info(reason)
        return {**base, "status": "unchanged", "version": champion.version, "reason": reason}
    prepared = stages.prepare(feats.frame, spec)
    trained = train(prepared, spec, cfg, work_dir / "checkpoints", parent)
    clock.lap("train")
    exported = export_model(trained.model, prepared, work_dir, policy, parent)
    clock.lap("export")
    evaluated = evaluate(trained.model, prepared, exported, spec, policy, parent)
    clock.lap("evaluate")
    decision = gate(settings, policy, prepared, evaluated, exported, work_dir)
    clock.lap("gate")
    (work_dir / "gate_report.md").write_text(decision.to_markdown())
    (work_dir / "gate_report.json").write_text(decision.to_json())
    create_markdown_artifact(key="gate-decision", markdown=decision.to_markdown(),
                             description=f"Gate decision for batch {batch_dir.name}")
    tags = {"batch_id": batch_dir.name, "data_hash": feats.data_hash, "fingerprint": fp,
            "feature_service": "fraud_model_v1", "git_commit": registry.git_commit(),
            "prefect_flow_run_id": str(flow_run.id), "gate_decision": "promote" if decision.promote else "block",
            "train_window": prepared.splits.window("train", spec),
            "test_window": prepared.splits.window("test", spec),
            "threshold": f"{evaluated.threshold:.6f}"}
    _log_parent_summary(parent, evaluated, decision)
    registered = register(settings, parent, evaluated, decision, tags, params.actor)
    clock.lap("register")
    return {**base, "status": "promoted" if decision.promote else "blocked_model",
            "version": registered["version"], "previous_champion": registered["previous_champion"],
            "variant": evaluated.shipped.name, "reason": decision.reason(),
            "gate_report": str(work_dir / "gate_report.md"), "decision": decision.to_dict()}


def _log_parent_summary(parent: str, evaluated, decision) -> None:
    """Key metrics on the parent run, where `sluicegate status` reads them."""
    with mlflow.start_run(run_id=parent):
        shipped = evaluated.shipped
        mlflow.log_metrics({**{k: evaluated.shipped_metrics[k] for k in ("pr_auc", "roc_auc", "ece", "precision",
                                                                           "recall", "f1")},
                            "p50_ms_batch1": shipped.p50_ms_batch1, "p99_ms_batch1": shipped.p99_ms_batch1,
                            "rows_per_s_batch1024": shipped.rows_per_s, "threshold": evaluated.threshold})
        mlflow.log_text(json.dumps(decision.to_dict(), indent=2), "gate_report.json")
        mlflow.log_text(decision.to_markdown(), "gate_report.md")
