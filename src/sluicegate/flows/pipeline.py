"""training-pipeline: validate -> features -> train -> export -> evaluate -> gate -> register.

Each task calls one stage function from `sluicegate.stages` and logs its
one-line summary; the flow only decides what runs next.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from sluicegate import stages
from sluicegate.config import Settings, ensure_home
from sluicegate.features.catalog import FEATURE_SERVICE
from sluicegate.hardware import hardware
from sluicegate.policy import GatePolicy, load_policy
from sluicegate.ship import model_repository, registry
from sluicegate.ship.promote import gate_and_promote
from sluicegate.spec import DatasetSpec, load_spec
from sluicegate.train.config import TrainConfig
from sluicegate.train.loop import checkpoint_dir_for


class PipelineParams(BaseModel):
    """What the Prefect UI shows as the run form."""

    batch: str | None = Field(None, description="Raw batch id under SLUICEGATE_HOME/raw; empty = newest")
    max_epochs: int = Field(20, ge=1, le=200, description="Upper bound on training epochs")
    patience: int = Field(3, ge=1, le=20, description="Epochs without validation gain before stopping")
    seed: int = Field(0, description="Training seed")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="Training precision")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="Training device")
    model: Literal["mlp", "ft_transformer"] = Field("mlp", description="Architecture: MLP (fast) or FT-Transformer")
    compile: bool = Field(False, description="torch.compile the training step (first epoch pays the compile)")
    target: Literal["cpu", "cuda", "rocm"] = Field("cpu", description="Hardware the shipped model will run on")
    distill: bool = Field(False, description="Ship an MLP distilled from an FT-Transformer teacher")
    expectations: str = Field("expectations", description="Great Expectations context folder")
    actor: str = Field("pipeline", description="Who or what asked for this run, recorded on promotion")
    promote: bool = Field(True, description="Gate and promote now; off: register a challenger for `make deploy`")


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
        mlflow.log_params({"data_hash": outcome.data_hash, "feature_service": FEATURE_SERVICE})
        mlflow.log_metrics({"training_rows": outcome.rows, "customer_feature_rows": outcome.customer_rows,
                            "merchant_feature_rows": outcome.merchant_rows})
    get_run_logger().info(outcome.summary())
    return outcome


@task(name="train", retries=1, retry_delay_seconds=[5], cache_policy=NO_CACHE)
def train(prepared, spec: DatasetSpec, cfg: TrainConfig, checkpoint_dir: Path, parent: str):
    """Train (resuming from `checkpoint_dir/last.pt` if a previous attempt was killed); record the hardware."""
    logger = get_run_logger()
    mlflow.enable_system_metrics_logging()  # CPU, memory and (with nvidia-ml-py) GPU use, for this stage run only
    mlflow.set_system_metrics_sampling_interval(2)
    try:
        with registry.stage_run(parent, "train"):
            mlflow.log_params({f"train.{k}": v for k, v in cfg.__dict__.items()})
            result = stages.train_stage(prepared, spec, cfg, checkpoint_dir,
                                        on_epoch=lambda row: _log_epoch(row, logger))
            mlflow.log_dict(result.device, "hardware.json")
            mlflow.set_tags({f"hw.{k}": v for k, v in result.device.items()})
            mlflow.set_tags({"resumed_from_epoch": result.resumed_from_epoch, "checkpoint_dir": str(checkpoint_dir)})
            if result.distillation:
                mlflow.log_metrics({f"distill_{k}": v for k, v in result.distillation.items()})
    finally:
        mlflow.disable_system_metrics_logging()
        mlflow.set_system_metrics_sampling_interval(None)
    resumed = f", resumed after epoch {result.resumed_from_epoch}" if result.resumed_from_epoch else ""
    logger.info(f"train: {cfg.model}{' (distilled)' if cfg.distill else ''}, best epoch {result.best_epoch} of "
                f"{result.epochs_run}{resumed}, valid PR-AUC {result.best_valid_pr_auc:.4f} on "
                f"{result.device['device_kind']} x{result.device['world_size']} ({result.device['precision']}, "
                f"compile {'on' if cfg.compile else 'off'}) in {result.seconds:.1f}s")
    if result.distillation:
        d = result.distillation
        logger.info(f"distillation: student ROC-AUC {d['student_valid_roc_auc']:.4f} vs teacher "
                    f"{d['teacher_valid_roc_auc']:.4f}; student {d['student_speedup']:.1f}x the teacher's rows/s")
    return result


def _log_epoch(row: dict, logger) -> None:
    mlflow.log_metrics(row, step=row["epoch"])
    logger.info(f"epoch {row['epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"))


@task(name="export", cache_policy=NO_CACHE)
def export_model(model, prepared, out_dir: Path, policy: GatePolicy, parent: str):
    with registry.stage_run(parent, "export"):
        outcome = stages.export_stage(model, prepared, out_dir, policy)
        mlflow.log_metrics({"parity_max_abs_diff": outcome.parity.max_abs_diff,
                            **{f"max_abs_diff_{name}": d for name, d in outcome.max_abs_diff.items()}})
        mlflow.log_dict(outcome.providers, "variant_providers.json")
    get_run_logger().info(outcome.summary())
    return outcome


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(model, prepared, exported, spec: DatasetSpec, policy: GatePolicy, hw, parent: str):
    with registry.stage_run(parent, "evaluate"):
        outcome = stages.evaluate_stage(model, prepared, exported, spec, policy, hw)
        mlflow.log_metrics({f"torch_{k}": v for k, v in outcome.torch_metrics.items()})
        mlflow.log_table(_columns([v.__dict__ for v in outcome.variants]), "variants.json")
        mlflow.log_table(_columns(outcome.slices), "slices.json")
        mlflow.log_table(_columns(outcome.benchmark), "benchmark.json")
    create_table_artifact(key="variants", table=[v.__dict__ for v in outcome.variants],
                          description="Each ONNX variant on the test window and the target hardware")
    create_table_artifact(key="benchmark", table=outcome.benchmark,
                          description="MLPerf Inference scenarios per variant (SingleStream, Server, Offline)")
    get_run_logger().info(outcome.summary())
    return outcome


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


@task(name="register", retries=3, retry_delay_seconds=[2, 5, 15], cache_policy=NO_CACHE)
def register(settings: Settings, parent: str, evaluated, evidence_dir: Path, tags: dict):
    """A new model version carrying the shipped ONNX and its evidence; alias challenger."""
    client = registry.configure(settings)
    shipped = Path(evaluated.shipped.path)
    with registry.stage_run(parent, "register") as run:
        info = registry.log_onnx_model(shipped)
        mlflow.log_artifacts(str(evidence_dir), "evidence")
        version = registry.register_candidate(client, settings.model_name, info, run.info.run_id, shipped,
                                              {**tags, "variant": evaluated.shipped.name})
    get_run_logger().info(f"register: {settings.model_name} v{version.version} ({evaluated.shipped.name}) "
                          "registered as challenger")
    return version


@task(name="gate", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def gate(settings: Settings, policy: GatePolicy, spec: DatasetSpec, version, actor: str):
    """Every gate of gates.yaml against the current champion; promote only if all pass."""
    client = registry.configure(settings)
    outcome = gate_and_promote(settings, policy, spec, client, version, actor)
    create_markdown_artifact(key="gate-decision", markdown=outcome.report,
                             description=f"{settings.model_name} v{outcome.version}: {outcome.status}")
    get_run_logger().info(f"gate: {outcome.status.upper()} v{outcome.version}: {outcome.reason}")
    if outcome.status == "promoted":
        publish_model_repository()
    return outcome


@task(name="model-repository", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def publish_model_repository() -> str:
    """The champion as a Triton/KServe model repository, so the same artifact runs there too."""
    path = model_repository.export_champion()
    get_run_logger().info(f"model repository: {path}")
    return str(path)


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
    cfg = TrainConfig(model=params.model, max_epochs=params.max_epochs, patience=params.patience, seed=params.seed,
                      precision=params.precision, device=params.device, compile=params.compile, distill=params.distill)
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
        try:
            client.set_terminated(parent, status)
        except Exception as exc:  # MLflow down: keep the stage's own error, not this one
            get_run_logger().warning(f"could not close MLflow run {parent}: {exc}")


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
    fp = stages.fingerprint(feats.data_hash, cfg, spec, params.target)
    champion = registry.version_by_alias(client, settings.model_name, registry.CHAMPION)
    if champion is not None and champion.tags.get("fingerprint") == fp:
        reason = (f"champion v{champion.version} was trained on this exact data and configuration; "
                  "nothing new to promote")
        get_run_logger().info(reason)
        return {**base, "status": "unchanged", "version": str(champion.version), "reason": reason}
    prepared = stages.prepare(feats.frame, spec)
    # Keyed on data and config, so a retried or re-run flow resumes from the last epoch.
    checkpoints = checkpoint_dir_for(settings.paths.runs / "checkpoints", feats.data_hash, cfg)
    trained = train(prepared, spec, cfg, checkpoints, parent)
    clock.lap("train")
    exported = export_model(trained.model, prepared, work_dir, policy, parent)
    clock.lap("export")
    hw = hardware(settings.model_copy(update={"target": params.target}))
    evaluated = evaluate(trained.model, prepared, exported, spec, policy, hw, parent)
    clock.lap("evaluate")
    tags = {"batch_id": batch_dir.name, "data_hash": feats.data_hash, "fingerprint": fp,
            "feature_service": FEATURE_SERVICE, "git_commit": registry.git_commit(),
            "prefect_flow_run_id": str(flow_run.id), "target": params.target,
            "train_window": prepared.splits.window("train", spec),
            "test_window": prepared.splits.window("test", spec),
            "threshold": f"{evaluated.threshold:.6f}"}
    evidence_dir = stages.write_evidence(evaluated, exported, work_dir / "evidence",
                                         extra={"training": trained.device | {"best_epoch": trained.best_epoch}})
    _log_parent_summary(parent, evaluated)
    version = register(settings, parent, evaluated, evidence_dir, tags)
    clock.lap("register")
    if not params.promote:
        return {**base, "status": "registered", "version": str(version.version), "variant": evaluated.shipped.name,
                "reason": f"v{version.version} registered as challenger; run `make deploy` to gate and promote it"}
    outcome = gate(settings, policy, spec, version, params.actor)
    clock.lap("gate")
    (work_dir / "gate_report.md").write_text(outcome.report)
    status = {"promoted": "promoted", "blocked": "blocked_model", "lost_race": "lost_race"}[outcome.status]
    return {**base, "status": status, "version": str(version.version),
            "previous_champion": outcome.champion_before, "variant": evaluated.shipped.name,
            "reason": outcome.reason, "gate_report": str(work_dir / "gate_report.md"),
            "decision": outcome.decision.to_dict() if outcome.decision else None}


def _log_parent_summary(parent: str, evaluated) -> None:
    """Key metrics on the parent run, where `sluicegate status` reads them."""
    shipped, metrics = evaluated.shipped, evaluated.shipped_metrics
    with mlflow.start_run(run_id=parent):
        mlflow.log_metrics({**{k: metrics[k] for k in ("pr_auc", "roc_auc", "ece", "precision", "recall", "f1")},
                            "p50_ms_batch1": shipped.p50_ms_batch1, "p99_ms_batch1": shipped.p99_ms_batch1,
                            "server_p99_ms": shipped.server_p99_ms, "rows_per_s": shipped.rows_per_s,
                            "cost_per_million": shipped.cost_per_million, "threshold": evaluated.threshold})
