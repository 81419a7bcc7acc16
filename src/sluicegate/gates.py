"""The gate policy and the promotion decision.

Every threshold comes from gates.yaml; the decision lists each gate with its
threshold, measured value and verdict, so a reviewer sees exactly why.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


class GatePolicyError(ValueError):
    """gates.yaml is missing, incomplete or names an unknown gate."""


class GatePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_pr_auc: float
    max_ece: float
    max_quantization_drop: float
    parity_tolerance: float
    max_p99_latency_ms: float
    max_regression_vs_champion: float


def load_policy(path: Path) -> GatePolicy:
    """Read gates.yaml, failing before any work with what is wrong in it."""
    if not path.exists():
        raise GatePolicyError(f"gate policy {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        return GatePolicy.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "missing":
                problems.append(f"missing gate '{key}'")
            elif err["type"] == "extra_forbidden":
                problems.append(f"unknown gate '{key}'")
            else:
                problems.append(f"'{key}': {err['msg']}")
        known = ", ".join(GatePolicy.model_fields)
        raise GatePolicyError(f"{path}: {'; '.join(problems)} (known gates: {known})") from None


@dataclass
class VariantReport:
    """One exported variant of the candidate, as measured on the test window."""

    name: str  # "fp32" or "int8"
    path: str
    pr_auc: float
    roc_auc: float
    ece: float
    pr_auc_drop: float  # torch PR-AUC minus this variant's
    max_abs_diff: float  # against torch on the golden batch
    size_bytes: int
    p50_ms_batch1: float
    p99_ms_batch1: float
    rows_per_s: float


@dataclass
class Evidence:
    """The measurements the gates judge."""

    shipped: VariantReport
    fp32_parity: float
    champion_version: str | None = None
    champion_pr_auc: float | None = None  # champion scored on the candidate's test window


@dataclass
class GateResult:
    gate: str
    threshold: float
    measured: float | None
    passed: bool
    detail: str


@dataclass
class GateDecision:
    promote: bool
    variant: str
    results: list[GateResult] = field(default_factory=list)

    @property
    def failed(self) -> list[GateResult]:
        return [r for r in self.results if not r.passed]

    def reason(self) -> str:
        if self.promote:
            return f"all {len(self.results)} gates passed"
        return "; ".join(f"{r.gate}: {r.detail}" for r in self.failed)

    def to_dict(self) -> dict:
        return {"promote": self.promote, "variant": self.variant, "reason": self.reason(),
                "gates": [asdict(r) for r in self.results]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self, title: str = "Gate decision") -> str:
        verdict = "PROMOTE" if self.promote else "BLOCKED"
        lines = [f"# {title}: {verdict}", "", f"Shipped variant: `{self.variant}`. {self.reason()}.", "",
                 "| gate | threshold | measured | result | detail |", "|---|---|---|---|---|"]
        for r in self.results:
            measured = "n/a" if r.measured is None else f"{r.measured:.6g}"
            lines.append(f"| {r.gate} | {r.threshold:.6g} | {measured} | "
                         f"{'pass' if r.passed else '**FAIL**'} | {r.detail} |")
        return "\n".join(lines) + "\n"


def select_variant(variants: list[VariantReport], policy: GatePolicy) -> VariantReport:
    """The fastest variant (single-row p50) that keeps accuracy within the policy.

    Falls back to fp32 so that a failing quantization is reported by the gates,
    never silently shipped.
    """
    ok = [v for v in variants if v.pr_auc_drop <= policy.max_quantization_drop
          and (v.name != "fp32" or v.max_abs_diff <= policy.parity_tolerance)]
    if ok:
        return min(ok, key=lambda v: v.p50_ms_batch1)
    return next(v for v in variants if v.name == "fp32")


def decide(policy: GatePolicy, evidence: Evidence) -> GateDecision:
    """Apply every gate; promote only if all pass."""
    v = evidence.shipped
    results = [
        _at_least("min_pr_auc", policy.min_pr_auc, v.pr_auc, "test-window PR-AUC"),
        _at_most("max_ece", policy.max_ece, v.ece, "expected calibration error"),
        _at_most("max_quantization_drop", policy.max_quantization_drop, v.pr_auc_drop,
                 f"PR-AUC lost by shipping {v.name} instead of torch"),
        _at_most("parity_tolerance", policy.parity_tolerance, evidence.fp32_parity,
                 "max |p_onnx - p_torch| of the fp32 export"),
        _at_most("max_p99_latency_ms", policy.max_p99_latency_ms, v.p99_ms_batch1,
                 "single-row p99 latency (ms)"),
        _champion_gate(policy, evidence),
    ]
    return GateDecision(promote=all(r.passed for r in results), variant=v.name, results=results)


def _at_least(gate: str, threshold: float, measured: float, what: str) -> GateResult:
    passed = measured >= threshold
    verb = "meets" if passed else "is below"
    return GateResult(gate, threshold, measured, passed, f"{what} {measured:.4g} {verb} {threshold:.4g}")


def _at_most(gate: str, threshold: float, measured: float, what: str) -> GateResult:
    passed = measured <= threshold
    verb = "within" if passed else "exceeds"
    return GateResult(gate, threshold, measured, passed, f"{what} {measured:.4g} {verb} {threshold:.4g}")


def _champion_gate(policy: GatePolicy, evidence: Evidence) -> GateResult:
    gate = "max_regression_vs_champion"
    if evidence.champion_pr_auc is None:
        return GateResult(gate, policy.max_regression_vs_champion, None, True, "no champion yet")
    regression = evidence.champion_pr_auc - evidence.shipped.pr_auc
    passed = regression <= policy.max_regression_vs_champion
    detail = (f"PR-AUC {evidence.shipped.pr_auc:.4f} vs champion v{evidence.champion_version} "
              f"{evidence.champion_pr_auc:.4f} on the same window: "
              f"{'gain' if regression <= 0 else 'loss'} {abs(regression):.4f}")
    return GateResult(gate, policy.max_regression_vs_champion, regression, passed, detail)
