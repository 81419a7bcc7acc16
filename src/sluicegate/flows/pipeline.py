"""training-pipeline, in the order it runs:

1. validate  (data.stages)      GX suite of the spec; a failing batch is quarantined and nothing trains
2. features  (features.stages)  feature tables, the online state reconciled, the point-in-time training set
3. train     (train.stages)     time split, model inputs, training (DDP when more than one device)
4. export    (ship.stages)      ONNX, parity against torch, quantized variants
5. evaluate  (ship.stages)      metrics, slices, calibration, robustness, behaviour, benchmarks
   serving-parity (ship.stages) the test window replayed through the serving feature path
6. register  (ship.stages)      a model version with its evidence, alias challenger
7. gate      (ship.stages)      every gate of gates.yaml; champion moves only if all pass

Each task is one stage call inside its MLflow stage run, with its retries and its Prefect artifacts.
The feature stage holds the `features-<table>` slot, training the `train-<model>` slot and gating the
`promote-<model>` slot (`flows.limits`), so two feature builds of one table, or two trainings or two
promotions of one model, never overlap, whichever machine runs them. A run a gate
blocked ends Failed, saying why (`flows.outcome`); a retrain's outcome (nightly or started by the
monitor) goes into the retrain ledger (`operate.retrains`), which stops the monitor's triggers after
too many blocked in a row.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

import mlflow
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import Field

from sluicegate import compute
from sluicegate.config import Settings, ensure_home
from sluicegate.data import stages as data
from sluicegate.features import stages as features
from sluicegate.flows.deploy import publish_model_repository
from sluicegate.flows.limits import FEATURES, PROMOTE, TRAIN, one_at_a_time
from sluicegate.flows.monitor import RETRAIN_TAG
from sluicegate.flows.outcome import finish, gated_flow
from sluicegate.hardware import hardware
from sluicegate.operate import retrains
from sluicegate.policy import GatePolicy, load_policy
from sluicegate.ship import promote, registry
from sluicegate.ship import stages as ship
from sluicegate.spec import DatasetSpec, load_spec
from sluicegate.train import stages as training
from sluicegate.train.config import TrainConfig

SCHEDULED_ACTOR = "scheduled-retrain"  # the actor scheduled-retrain runs this flow as
TRIGGERED_ACTOR = "monitor:"  # the prefix of the actor of a run the monitor started


class PipelineParams(TrainConfig):
    """What the Prefect UI shows as the run form: the training settings plus what this run is about."""

    batch: str | None = Field(None, description="Raw batch id under SLUICEGATE_HOME/raw; empty = newest")
    target: Literal["cpu", "cuda", "tensorrt", "rocm"] | None = Field(
        None, description="Hardware the shipped model will run on; empty: SLUICEGATE_TARGET, else the hardware "
                          "profile's target (hardware.yaml). Its onnxruntime provider must be installed here")
    expectations: str = Field("expectations", description="Great Expectations context folder")
    actor: str = Field("pipeline", description="Who or what asked for this run, recorded on promotion")
    promote: bool = Field(True, description="Gate and promote now; off: register a challenger for `make deploy`")

    def train_config(self) -> TrainConfig:
        return TrainConfig(**self.model_dump(include=set(TrainConfig.model_fields)))


@task(name="validate", cache_policy=NO_CACHE)
def validate(settings: Settings, spec: DatasetSpec, batch_dir: Path, context_root: Path, parent: str):
    with registry.stage_run(parent, "validate"):
        outcome = data.validate_stage(settings, spec, batch_dir, context_root)
        mlflow.log_metrics({"rows": outcome.report.row_count, "failed_checks": len(outcome.report.failures)})
        mlflow.log_dict(outcome.report.to_dict(), "validation_report.json")
    if not outcome.passed:
        create_markdown_artifact(key="validation-report", markdown=outcome.report.to_markdown(),
                                 description=f"Batch {batch_dir.name} quarantined")
    get_run_logger().info(outcome.summary())
    return outcome


@task(name="features", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def build_features(settings: Settings, spec: DatasetSpec, validated, parent: str):
    with one_at_a_time(FEATURES, settings), registry.stage_run(parent, "features"):
        outcome = features.feature_stage(settings, spec, validated.rows)
        mlflow.log_params(outcome.params())
        mlflow.log_metrics(outcome.metrics())
    get_run_logger().info(outcome.summary())
    return outcome


@task(name="train", retries=1, retry_delay_seconds=[5], cache_policy=NO_CACHE)
def train(settings: Settings, prepared, spec: DatasetSpec, cfg: TrainConfig, checkpoint_dir: Path, data_hash: str,
          parent: str):
    """Train (resuming from `checkpoint_dir/last.pt` if a previous attempt was killed); record the hardware.
    One training of this model at a time: the `train-<model>` slot is held throughout."""
    logger = get_run_logger()
    with one_at_a_time(TRAIN, settings):
        outcome = _train(prepared, spec, cfg, checkpoint_dir, data_hash, parent, logger)
    logger.info(outcome.summary())
    return outcome


def _train(prepared, spec: DatasetSpec, cfg: TrainConfig, checkpoint_dir: Path, data_hash: str, parent: str,
           logger):
    mlflow.enable_system_metrics_logging()  # CPU, memory and (with nvidia-ml-py) GPU use, for this stage run only
    mlflow.set_system_metrics_sampling_interval(2)
    try:
        with registry.stage_run(parent, "train"):
            mlflow.log_params({f"train.{k}": v for k, v in cfg.model_dump().items()})
            registry.log_training_dataset(prepared.splits.rows("train"), data_hash, "training", targets=spec.label)
            outcome = training.train_stage(prepared, spec, cfg, checkpoint_dir,
                                           on_epoch=lambda row: _log_epoch(row, logger))
            mlflow.log_dict(outcome.device, "hardware.json")
            mlflow.set_tags(outcome.tags() | {"checkpoint_dir": str(checkpoint_dir)})
            if outcome.distillation:
                mlflow.log_metrics({f"distill_{k}": v for k, v in outcome.distillation.items()})
    finally:
        mlflow.disable_system_metrics_logging()
        mlflow.set_system_metrics_sampling_interval(None)
    return outcome


def _log_epoch(row: dict, logger) -> None:
    mlflow.log_metrics(row, step=row["epoch"])
    logger.info(f"epoch {row['epoch']}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "epoch"))


@task(name="export", cache_policy=NO_CACHE)
def export_model(model, prepared, out_dir: Path, policy: GatePolicy, parent: str):
    with registry.stage_run(parent, "export"):
        outcome = ship.export_stage(model, prepared, out_dir, policy)
        mlflow.log_metrics(outcome.metrics())
        mlflow.log_dict(outcome.providers, "variant_providers.json")
    get_run_logger().info(outcome.summary())
    return outcome


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(model, prepared, exported, spec: DatasetSpec, policy: GatePolicy, hw, parent: str):
    with registry.stage_run(parent, "evaluate"):
        outcome = ship.evaluate_stage(model, prepared, exported, spec, policy, hw)
        mlflow.log_params(hw.params() | {"hardware.shipped_provider": outcome.shipped.provider})
        mlflow.log_metrics({f"torch_{k}": v for k, v in outcome.torch_metrics.items()})
        for name, rows in outcome.tables().items():
            mlflow.log_table(_columns(rows), f"{name}.json")
    create_table_artifact(key="variants", table=outcome.tables()["variants"],
                          description="Each ONNX variant on the test window and the target hardware")
    create_table_artifact(key="benchmark", table=outcome.benchmark,
                          description="MLPerf Inference scenarios per variant (SingleStream, Server, Offline)")
    get_run_logger().info(outcome.summary())
    return outcome


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


@task(name="serving-parity", cache_policy=NO_CACHE)
def check_serving(settings: Settings, spec: DatasetSpec, prepared, evaluated, parent: str):
    """The test window replayed through the serving feature path, for the `max_serving_skew` gate."""
    with registry.stage_run(parent, "serving-parity"):
        outcome = ship.serving_parity_stage(settings, spec, prepared, evaluated)
        mlflow.log_metrics({"serving_skew": outcome.skew, "served_pr_auc": outcome.served_pr_auc,
                            "serving_rows": outcome.rows})
        mlflow.log_dict(outcome.to_dict(), "serving_parity.json")
    get_run_logger().info(outcome.summary())
    return outcome


@task(name="register", retries=3, retry_delay_seconds=[2, 5, 15], cache_policy=NO_CACHE)
def register(settings: Settings, parent: str, evaluated, evidence_dir: Path, tags: dict):
    """A new model version carrying the shipped ONNX and its evidence; alias challenger."""
    client = registry.configure(settings)
    with registry.stage_run(parent, "register") as run:
        outcome = ship.register_stage(client, settings.model_name, run.info.run_id, evaluated, evidence_dir, tags)
    get_run_logger().info(outcome.summary())
    return outcome.version


@task(name="gate", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE)
def gate(settings: Settings, policy: GatePolicy, spec: DatasetSpec, version, actor: str, work_dir: Path):
    """Every gate of gates.yaml against the current champion; promote only if all pass. One promotion
    of this model at a time: the `promote-<model>` slot is held from the gates to the published repository."""
    client = registry.configure(settings)
    with one_at_a_time(PROMOTE, settings):
        outcome = promote.gate_stage(settings, policy, spec, client, version, actor, work_dir)
        create_markdown_artifact(key="gate-decision", markdown=outcome.report,
                                 description=f"{settings.model_name} v{outcome.version}: {outcome.status}")
        get_run_logger().info(outcome.summary())
        if outcome.status == "promoted":
            publish_model_repository()
    return outcome


@gated_flow(name="training-pipeline", log_prints=True)
def training_pipeline(params: PipelineParams | None = None) -> dict:
    """Run one raw batch through every gate; returns what happened and why (a run a gate blocked ends
    Failed with the reasons, and still returns them to an in-process caller)."""
    params = params or PipelineParams()
    settings = Settings()
    if params.target:  # the run form's target, in the settings every stage (the gate's server_load too) reads
        settings = settings.model_copy(update={"target": params.target})
    hardware(settings)  # an unknown target, or one whose provider is not installed, fails before any work
    policy = load_policy(settings.gates_path)  # a broken policy fails before any work
    spec = load_spec(settings.spec_path)
    ensure_home(settings.paths)
    client = registry.configure(settings)
    batch_dir = data.find_batch(settings, params.batch)
    run_id = flow_run.id or "local"
    work_dir = settings.paths.runs / f"{batch_dir.name}-{str(run_id)[:8]}"
    parent = mlflow.start_run(run_name=f"pipeline {batch_dir.name}",
                              tags={"batch_id": batch_dir.name, "prefect_flow_run_id": str(run_id)}).info.run_id
    mlflow.end_run()
    status = "FAILED"
    try:
        result = _run_stages(settings, spec, policy, params, batch_dir, work_dir, parent, client)
        status = "FINISHED"
    finally:
        try:
            client.set_terminated(parent, status)
        except Exception as exc:  # MLflow down: keep the stage's own error, not this one
            get_run_logger().warning(f"could not close MLflow run {parent}: {exc}")
    _record_retrain(settings, params, result, str(run_id))
    return finish(result)


def _retrain_kind(actor: str) -> str | None:
    """`scheduled` for scheduled-retrain's run, `triggered` for a run the monitor started, else None."""
    if actor == SCHEDULED_ACTOR:
        return "scheduled"
    if actor.startswith(TRIGGERED_ACTOR) or RETRAIN_TAG in (flow_run.tags or ()):
        return "triggered"
    return None


def _record_retrain(settings: Settings, params: PipelineParams, result: dict, run_id: str) -> None:
    """A retrain's outcome into the retrain ledger; a ledger that cannot be written is a warning, not
    this run's failure (the run's own outcome stands)."""
    kind = _retrain_kind(params.actor)
    if kind is None:
        return
    try:
        streak = retrains.record_retrain(settings, result, kind, run_id)
    except (OSError, ValueError) as exc:
        get_run_logger().warning(f"retrain outcome not recorded in the retrain ledger: {exc}")
        return
    if streak is not None:
        get_run_logger().info(f"{kind} retrain: {streak.summary()}")


class _Stopwatch:
    """Seconds and peak memory per stage, for the run summary."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.peak_gb: dict[str, float] = {}  # this process's peak RSS during each stage (Linux only)
        self._last = time.perf_counter()
        compute.peak_rss_gb()  # from here on

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 2)
        self._last = now
        if (peak := compute.peak_rss_gb()) is not None:
            self.peak_gb[stage] = round(peak, 3)
        compute.release_free_memory()


def _run_stages(settings, spec, policy, params: PipelineParams, batch_dir, work_dir, parent, client) -> dict:
    cfg = params.train_config()
    clock = _Stopwatch()
    base = {"batch": batch_dir.name, "mlflow_run_id": parent, "work_dir": str(work_dir),
            "stage_seconds": clock.seconds, "stage_peak_gb": clock.peak_gb}
    # Extract
    # Prefect keeps every task's arguments and result until the flow ends, so a large table travels
    # inside an outcome that is emptied once the next step has it, rather than as an argument.
    validated = validate(settings, spec, batch_dir, Path(params.expectations), parent)
    clock.lap("validate")
    if not validated.passed:
        return {**base, **validated.result()}
    feats = build_features(settings, spec, validated, parent)
    validated.rows = None  # the raw rows are in the feature frame now: holding both doubles the run's memory
    clock.lap("features")
    hw = hardware(settings)
    fp = training.fingerprint(feats.data_hash, cfg, spec, hw.target)
    if same := ship.unchanged(client, settings.model_name, fp):
        get_run_logger().info(same["reason"])
        return {**base, **same}
    if changed := ship.spec_change(client, settings.model_name, spec):
        get_run_logger().info(changed)
        base["spec_change"] = changed
    # Transform
    prepared = training.prepare(feats.frame, spec)
    feats.frame = None  # the splits hold the rows from here on: one copy of the table, not two
    checkpoints = training.checkpoint_dir(settings, feats.data_hash, cfg, spec)
    trained = train(settings, prepared, spec, cfg, checkpoints, feats.data_hash, parent)
    clock.lap("train")
    exported = export_model(trained.model, prepared, work_dir, policy, parent)
    clock.lap("export")
    evaluated = evaluate(trained.model, prepared, exported, spec, policy, hw, parent)
    clock.lap("evaluate")
    parity = check_serving(settings, spec, prepared, evaluated, parent)
    clock.lap("serving-parity")
    # Load
    tags = ship.lineage_tags(batch_dir.name, feats.data_hash, fp, str(flow_run.id), hw.target, prepared, spec,
                             evaluated)
    evidence_dir = ship.write_evidence(evaluated, exported, work_dir / "evidence",
                                       extra={"training": trained.device | {"best_epoch": trained.best_epoch},
                                              "serving": parity.to_dict()})
    _log_parent_summary(parent, evaluated)
    version = register(settings, parent, evaluated, evidence_dir, tags)
    clock.lap("register")
    if not params.promote:
        return {**base, "status": "registered", "version": str(version.version), "variant": evaluated.shipped.name,
                "reason": f"v{version.version} registered as challenger; run `make deploy` to gate and promote it"}
    outcome = gate(settings, policy, spec, version, params.actor, work_dir)
    clock.lap("gate")
    return {**base, **outcome.pipeline_result(evaluated.shipped.name, work_dir / "gate_report.md")}


def _log_parent_summary(parent: str, evaluated) -> None:
    """Key metrics on the parent run, where `sluicegate status` reads them."""
    with mlflow.start_run(run_id=parent):
        mlflow.log_metrics(evaluated.key_metrics())
