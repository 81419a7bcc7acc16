"""Gate a registered version against the current champion and promote it if every gate passes.

The training pipeline calls this right after registering a candidate; `make
deploy` calls it for the newest challenger. Both go through the same code, so a
promotion always rests on the same evidence and the same policy.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion

from sluicegate.config import Settings
from sluicegate.features.inputs import tensor_widths
from sluicegate.hardware import Hardware, hardware
from sluicegate.policy import GatePolicy
from sluicegate.ship import baselines, registry
from sluicegate.ship import card as modelcard
from sluicegate.ship.evaluate import Comparison
from sluicegate.ship.gates import (
    REQUIRED_EVIDENCE,
    Evidence,
    GateDecision,
    GateResult,
    VariantReport,
    decide,
)
from sluicegate.ship.holdout import compare_on_holdout, lift_over_baseline, own_inputs, score_holdout
from sluicegate.ship.model_repository import export_champion
from sluicegate.spec import DatasetSpec, parse_spec
from sluicegate.train import identity

MAX_SPEC_CHANGES = 12  # changes of the model spec listed in the gate report; the rest are counted
EXIT_CODES = {"promoted": 0, "nothing_newer": 0, "blocked": 3, "lost_race": 4}


@dataclass
class DeployOutcome:
    status: Literal["promoted", "blocked", "nothing_newer", "lost_race"]
    reason: str
    version: str | None = None
    champion_before: str | None = None
    decision: GateDecision | None = None
    report: str = ""
    artifacts: dict[str, str] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    def summary(self) -> str:
        return f"gate: {self.status.upper()} v{self.version}: {self.reason}"

    def pipeline_result(self, variant: str, report_path: Path) -> dict:
        """The training pipeline's answer after the gates ("blocked" is the model's, not the data's)."""
        status = {"promoted": "promoted", "blocked": "blocked_model", "lost_race": "lost_race"}[self.status]
        return {"status": status, "version": self.version, "previous_champion": self.champion_before,
                "variant": variant, "reason": self.reason, "gate_report": str(report_path),
                "decision": self.decision.to_dict() if self.decision else None}

    def to_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "version": self.version,
                "champion_before": self.champion_before, "exit_code": self.exit_code,
                "decision": self.decision.to_dict() if self.decision else None, "artifacts": self.artifacts}


def deploy_newest(settings: Settings, policy: GatePolicy, spec: DatasetSpec, actor: str) -> DeployOutcome:
    """Gate the newest challenger against the champion; promote it if every gate passes."""
    client = registry.configure(settings)
    name = settings.model_name
    challenger = registry.version_by_alias(client, name, registry.CHALLENGER)
    champion = registry.version_by_alias(client, name, registry.CHAMPION)
    if challenger is None:
        return DeployOutcome("nothing_newer", f"{name} has no challenger to deploy")
    if champion is not None and int(challenger.version) <= int(champion.version):
        return DeployOutcome("nothing_newer", f"champion v{champion.version} is already the newest version",
                             version=str(champion.version), champion_before=str(champion.version))
    return gate_and_promote(settings, policy, spec, client, challenger, actor)


def gate_and_promote(settings: Settings, policy: GatePolicy, spec: DatasetSpec, client: MlflowClient,
                     candidate: ModelVersion, actor: str) -> DeployOutcome:
    name, version = settings.model_name, str(candidate.version)
    champion = registry.version_by_alias(client, name, registry.CHAMPION)
    champion_version = str(champion.version) if champion else None
    with tempfile.TemporaryDirectory(prefix="sluicegate-deploy-") as tmp:
        work = Path(tmp)
        raw, missing = load_evidence(client, candidate, work)
        check, candidate_onnx = _load_as_served(settings, spec, client, candidate)
        comparisons, spec_row, champion_raw = [], None, None
        rival = champion is not None and champion_version != version
        if rival:
            champion_raw = load_evidence(client, champion, work / "champion")[0]
            spec_row = _spec_row(candidate, champion, raw, champion_raw)
        lift, note = None, ""
        if raw is not None and candidate_onnx is not None:
            onnx_path = work / "candidate.onnx"
            onnx_path.write_bytes(candidate_onnx)
            holdout = pd.read_parquet(work / "evidence" / "holdout.parquet")
            scores = score_holdout(onnx_path, holdout, spec)
            lift = lift_over_baseline(scores, holdout, spec, policy, baselines.best(raw.get("baselines", [])))
            if rival:
                comparisons, note = _against_champion(client, champion, champion_raw, spec_row, scores, holdout,
                                                      spec, policy, work)
        evidence = _evidence(raw, missing, champion_version, comparisons)
        evidence.baseline, evidence.baselines, evidence.champion_note = lift, (raw or {}).get("baselines", []), note
        decision = decide(policy, evidence, _links(settings, candidate))
        decision.results += [check, *([spec_row] if spec_row else [])]
        artifacts = _publish(client, name, candidate, raw, decision, comparisons + ([lift] if lift else []), work)
    report = decision.to_markdown(title=f"{name} v{version}")
    if not decision.promote:
        return DeployOutcome("blocked", decision.reason(), version, champion_version, decision, report, artifacts)
    event = {"event": "promote", "actor": actor, "reason": decision.reason(),
             "gate_report": artifacts.get("gate_report", "")}
    try:
        registry.move_champion(client, name, version, champion_version, event, settings.paths.locks)
    except registry.LostRace as lost:
        return DeployOutcome("lost_race", str(lost), version, champion_version, decision, report, artifacts)
    return DeployOutcome("promoted", decision.reason(), version, champion_version, decision, report, artifacts)


def gate_stage(settings: Settings, policy: GatePolicy, spec: DatasetSpec, client: MlflowClient,
               version: ModelVersion, actor: str, work_dir: Path) -> DeployOutcome:
    """Every gate of gates.yaml against the current champion; promoted only if all pass. The gate
    report lands in the run's folder either way, and a new champion is published as a model repository."""
    outcome = gate_and_promote(settings, policy, spec, client, version, actor)
    (work_dir / "gate_report.md").write_text(outcome.report)
    return outcome


def publish_model_repository_stage() -> Path:
    """The champion as a Triton/KServe model repository, so the same artifact runs there too."""
    return export_champion()


def server_load_check(settings: Settings, spec: DatasetSpec, client: MlflowClient,
                      version: ModelVersion) -> GateResult:
    """The model server's own load path on the candidate: registry source, sha256, tensor contract,
    threshold tag and a warm-up batch. A version every gate passes but the server would refuse must
    not become champion: the server would keep serving the old one while the registry says otherwise."""
    return _load_as_served(settings, spec, client, version)[0]


def _load_as_served(settings: Settings, spec: DatasetSpec, client: MlflowClient,
                    version: ModelVersion) -> tuple[GateResult, bytes | None]:
    """The server_load gate, and the hash-checked ONNX bytes when they could be fetched
    (the champion comparison scores these same bytes, so the artifact is downloaded once).

    A fetch that failed (`FetchFailed`: the registry or artifact store down) raises instead of
    failing the gate: it says nothing against the model, so it must not record a block on it; the
    caller's retries (the gate task's) try again."""
    from sluicegate.ship.loader import ModelRejected, choose_providers, fetch_onnx, load_from_bytes

    evidence = "sluicegate.ship.loader.load_from_bytes"
    data = None
    try:
        data = fetch_onnx(client, version)
        load_from_bytes(settings.model_name, str(version.version), data, version.tags.get("sha256"),
                        version.tags.get("threshold"), version.tags.get("variant", ""), 1,
                        choose_providers([hardware(settings).provider]), tensor_widths(spec))
    except ModelRejected as exc:
        return GateResult("server_load", 0.0, 1.0, False, f"the model server would refuse it: {exc}", evidence), data
    return GateResult("server_load", 0.0, 0.0, True, "fetched by hash, meets the tensor contract, warms up",
                      evidence), data


def _spec_row(candidate: ModelVersion, champion: ModelVersion, raw: dict | None,
              champion_raw: dict | None) -> GateResult:
    """The model spec's changes since the champion, as a report row that never blocks: measured is the
    number of changed keys (0: same inputs, so the two models are compared on the same rows)."""
    new, old = candidate.tags.get("spec_hash"), champion.tags.get("spec_hash")
    where = "evidence/evidence.json: dataset.model_spec"
    if new == old or None in (new, old):  # a version from before spec hashes: the same inputs as before
        return GateResult("model_spec", 0, 0.0, True, f"same model spec {new or '(not recorded)'} as champion "
                          f"v{champion.version}", where)
    changes = identity.spec_diff(_model_spec(champion_raw), _model_spec(raw)) or ["(the recorded specs are equal)"]
    shown = "; ".join(changes[:MAX_SPEC_CHANGES]) + (f"; and {len(changes) - MAX_SPEC_CHANGES} more"
                                                      if len(changes) > MAX_SPEC_CHANGES else "")
    return GateResult("model_spec", 0, float(len(changes)), True,
                      f"model spec {old} (champion v{champion.version}) -> {new}: {shown}", where)


def _against_champion(client: MlflowClient, champion: ModelVersion, champion_raw: dict | None,
                      spec_row: GateResult, scores, holdout: pd.DataFrame, spec: DatasetSpec, policy: GatePolicy,
                      work: Path) -> tuple[list[Comparison], str]:
    """The champion against the candidate's scores on the candidate's held-out rows: on the candidate's
    inputs when the model spec is the same, else on the inputs the champion's own spec (kept in its
    evidence) builds from those rows. No comparisons, and why, when neither is possible."""
    inputs = None
    if spec_row.measured != 0:
        kept = ((champion_raw or {}).get("dataset") or {}).get("spec")
        inputs = own_inputs(holdout, parse_spec(kept)) if kept else "its evidence has no spec"
        if isinstance(inputs, str):
            return [], (f"not compared: champion v{champion.version} reads inputs of another model spec and "
                        f"{inputs}; judged by the other gates")
        spec_row.detail += "; each model scored on its own inputs of the same rows"
    champion_onnx = registry.download_onnx(client, champion, work / "champion")
    return compare_on_holdout(champion_onnx, scores, holdout, spec, policy, inputs), ""


def _model_spec(raw: dict | None) -> dict:
    return ((raw or {}).get("dataset") or {}).get("model_spec") or {}


def load_evidence(client: MlflowClient, version: ModelVersion, work: Path) -> tuple[dict | None, list[str]]:
    """Download the version's evidence; list what is missing (a version without it cannot pass)."""
    missing = [] if version.tags.get("sha256") else ["sha256 tag"]
    if not version.run_id:
        return None, [*missing, "training run"]
    names = {a.path for a in client.list_artifacts(version.run_id, "evidence")}
    missing += [f for f in REQUIRED_EVIDENCE if f"evidence/{f}" not in names]
    if "evidence/evidence.json" not in names or "evidence/holdout.parquet" not in names:
        return None, missing
    local = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="evidence",
                                                     dst_path=str(work)))
    return json.loads((local / "evidence.json").read_text()), missing


def _evidence(raw: dict | None, missing: list[str], champion_version: str | None,
              comparisons: list[Comparison]) -> Evidence:
    if raw is None:  # nothing measured: every measurement fails its gate
        nan = float("nan")
        unknown = {"name": "unknown", "path": "", "provider": "unknown", "size_bytes": 0}
        shipped = VariantReport(**{f.name: nan for f in fields(VariantReport)} | unknown)
        return Evidence(shipped=shipped, fp32_parity=nan, robustness_worst=nan, behaviour_violation_rate=nan,
                        champion_version=champion_version, missing=missing or ["evidence.json"])
    return Evidence(shipped=VariantReport(**raw["shipped"]), fp32_parity=raw["fp32_parity"],
                    robustness_worst=max(raw["robustness"].values()),
                    behaviour_violation_rate=raw["behaviour"]["behaviour_violation_rate"],
                    champion_version=champion_version, comparisons=comparisons, missing=missing,
                    hardware=Hardware(**raw["hardware"]) if raw.get("hardware") else None,
                    serving_skew=(raw.get("serving") or {}).get("skew"),
                    serving_detail=(raw.get("serving") or {}).get("detail", ""))


def _links(settings: Settings, version: ModelVersion) -> dict[str, str]:
    run = f"mlflow run {version.run_id}"
    return {"metrics": f"{run}: evidence/evidence.json", "calibration": f"{run}: evidence/reliability.png",
            "variants": f"{run}: evidence/evidence.json (variants)", "robustness": f"{run}: evidence/evidence.json",
            "benchmark": f"{run}: evidence/benchmark.json", "comparison": f"{run}: comparison.json",
            "serving": f"{run}: evidence/evidence.json (serving)"}


def _publish(client: MlflowClient, name: str, version: ModelVersion, raw: dict | None, decision: GateDecision,
             comparisons: list[Comparison], work: Path) -> dict[str, str]:
    """Attach the gate report, comparison and model card to the version's run; tag the decision."""
    out = work / "publish"
    out.mkdir()
    (out / "gate_report.md").write_text(decision.to_markdown(title=f"{name} v{version.version}"))
    (out / "gate_report.json").write_text(decision.to_json())
    (out / "comparison.json").write_text(json.dumps([c.to_dict() for c in comparisons], indent=2))
    if raw is not None:
        (out / "model_card.md").write_text(modelcard.render(name, str(version.version), version.tags, raw, decision))
    artifacts = {}
    if version.run_id:
        for path in sorted(out.iterdir()):
            client.log_artifact(version.run_id, str(path))
            artifacts[path.stem] = f"runs:/{version.run_id}/{path.name}"
    registry.record_decision(client, name, str(version.version), decision.to_dict())
    return artifacts


def rollback(settings: Settings, to_version: str | None, actor: str, reason: str) -> dict:
    """Make the previous champion (or a named version) champion again, and record it."""
    client = registry.configure(settings)
    name = settings.model_name
    current = registry.version_by_alias(client, name, registry.CHAMPION)
    target = to_version or registry.previous_champion(client, name)
    if target is None:
        raise ValueError(f"{name} has no previous champion to roll back to; name a version with --to")
    try:
        version = client.get_model_version(name, str(target))
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code not in registry.NOT_FOUND_CODES:  # an outage is not "no such version"
            raise
        raise ValueError(f"{name} has no version {target}") from None
    if current is not None and str(current.version) == str(target):
        raise ValueError(f"v{target} is already champion")
    with tempfile.TemporaryDirectory() as tmp:  # refuse a version whose artifact no longer matches its hash
        registry.download_onnx(client, version, Path(tmp))
    event = {"event": "rollback", "actor": actor, "reason": reason}
    previous = registry.move_champion(client, name, str(target), str(current.version) if current else None,
                                      event, settings.paths.locks)
    return {"model": name, "from": previous, "to": str(target), "actor": actor, "reason": reason}
