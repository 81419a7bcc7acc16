"""The gate policy and the promotion decision.

Every threshold comes from gates.yaml; the decision lists each gate with its
threshold, measured value, verdict and evidence, so a reviewer sees exactly why.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from sluicegate.hardware import Hardware
from sluicegate.policy import GatePolicy
from sluicegate.ship.evaluate import Comparison

# Evidence a version must carry before it may be promoted (artifacts of its MLflow run).
REQUIRED_EVIDENCE = ("evidence.json", "holdout.parquet", "benchmark.json", "reliability.png")


@dataclass
class VariantReport:
    """One exported variant of the candidate, measured on the test window and the target hardware."""

    name: str  # "fp32", "fp16", "int8", "int8_qdq"
    path: str
    provider: str
    pr_auc: float
    roc_auc: float
    ece: float
    pr_auc_drop: float  # torch PR-AUC minus this variant's
    roc_auc_drop: float
    max_abs_diff: float  # against torch on the golden batch
    size_bytes: int
    p50_ms_batch1: float  # MLPerf SingleStream
    p90_ms_batch1: float
    p99_ms_batch1: float
    server_p99_ms: float  # MLPerf Server at the SLO's target rate
    rows_per_s: float  # MLPerf Offline
    memory_mb: float
    cost_per_million: float
    server_verdict: str = "not measured"  # LoadGen's validity of the Server run, with its reason if INVALID
    valid_pr_auc_drop: float | None = None  # the same drop on the validation window, which picks the variant
    device: str = ""  # what `provider` (the session's own get_providers()) ran on; empty in older evidence
    onnxruntime: str = ""  # the onnxruntime build that ran it


@dataclass
class Evidence:
    """The measurements the gates judge."""

    shipped: VariantReport
    fp32_parity: float
    robustness_worst: float
    behaviour_violation_rate: float
    champion_version: str | None = None
    comparisons: list[Comparison] = field(default_factory=list)  # overall first; empty without a champion
    champion_note: str = ""  # why there are no comparisons although there is a champion
    baseline: Comparison | None = None  # the candidate against the best baseline on the same rows
    baselines: list[dict] = field(default_factory=list)  # each baseline's name, validation and test PR-AUC
    missing: list[str] = field(default_factory=list)  # required evidence not found
    hardware: Hardware | None = None  # the target and price per hour the cost was computed at
    serving_skew: float | None = None  # largest share of replayed test rows a served feature differed on
    serving_detail: str = ""  # per skewed feature its share and largest gap, and PR-AUC served vs offline


@dataclass
class GateResult:
    gate: str
    threshold: float
    measured: float | None
    passed: bool
    detail: str
    evidence: str = ""


@dataclass
class GateDecision:
    variant: str
    results: list[GateResult] = field(default_factory=list)

    @property
    def promote(self) -> bool:
        """Promote only when every gate passed."""
        return all(r.passed for r in self.results)

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
                 "| gate | threshold | measured | result | detail | evidence |", "|---|---|---|---|---|---|"]
        for r in self.results:
            measured = "n/a" if r.measured is None else f"{r.measured:.6g}"
            lines.append(f"| {r.gate} | {r.threshold:.6g} | {measured} | "
                         f"{'pass' if r.passed else '**FAIL**'} | {r.detail} | {r.evidence} |")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_dict(cls, raw: dict) -> GateDecision:
        return cls(variant=raw["variant"], results=[GateResult(**r) for r in raw["gates"]])


def select_variant(variants: list[VariantReport], policy: GatePolicy) -> VariantReport:
    """The fastest variant whose accuracy stays within the policy.

    Fastest means the highest Offline throughput on the target's provider: it sets
    the cost per prediction, while single-row latency differences between variants
    are tens of microseconds and the latency SLO is gated separately. Falls back to
    fp32 so that a failing quantization is reported by the gates, never silently shipped.
    The accuracy read is the validation window's: the test window then grades the choice, not makes it.
    """
    ok = [v for v in variants if _choice_drop(v) <= policy.max_quantization_drop
          and (v.name != "fp32" or v.max_abs_diff <= policy.parity_tolerance)]
    if ok:
        return max(ok, key=lambda v: v.rows_per_s)
    return next(v for v in variants if v.name == "fp32")


def _choice_drop(v: VariantReport) -> float:
    return v.pr_auc_drop if v.valid_pr_auc_drop is None else v.valid_pr_auc_drop


def decide(policy: GatePolicy, evidence: Evidence, links: dict[str, str] | None = None) -> GateDecision:
    """Apply every gate; promote only if all pass."""
    links = links or {}
    v = evidence.shipped
    results = [
        _evidence_gate(evidence),
        _at_least("min_pr_auc", policy.min_pr_auc, v.pr_auc, "test-window PR-AUC", links.get("metrics", "")),
        _at_most("max_ece", policy.max_ece, v.ece, "expected calibration error", links.get("calibration", "")),
        _at_most("max_quantization_drop", policy.max_quantization_drop, v.pr_auc_drop,
                 f"PR-AUC lost by shipping {v.name} instead of torch", links.get("variants", "")),
        _at_most("parity_tolerance", policy.parity_tolerance, evidence.fp32_parity,
                 "max |p_onnx - p_torch| of the fp32 export", links.get("variants", "")),
        _at_most("max_robustness_drop", policy.max_robustness_drop, evidence.robustness_worst,
                 "worst PR-AUC drop under noise, missing history or a shuffled category",
                 links.get("robustness", "")),
        _at_most("max_behaviour_violation_rate", policy.max_behaviour_violation_rate,
                 evidence.behaviour_violation_rate, "worst share of rows breaking a behaviour check of the spec",
                 links.get("robustness", "")),
        _at_most("latency_slo_p99_ms", policy.latency_slo_p99_ms, v.server_p99_ms,
                 f"Server-scenario p99 (ms; LoadGen: {v.server_verdict}) at {policy.slo_target_qps:g} q/s "
                 f"on {ran_on(v)}",
                 links.get("benchmark", "")),
        *_cost_gate(policy, evidence, links.get("benchmark", "")),
        _serving_gate(policy, evidence, links.get("serving", "")),
        *_champion_gates(policy, evidence, links.get("comparison", "")),
        *_baseline_gate(policy, evidence, links.get("comparison", "")),
    ]
    return GateDecision(variant=v.name, results=results)


def _cost_gate(policy: GatePolicy, evidence: Evidence, link: str) -> list[GateResult]:
    """USD per million predictions of the shipped variant; only when gates.yaml sets a limit."""
    limit = policy.max_cost_per_million
    if limit is None:
        return []
    v, hw = evidence.shipped, evidence.hardware
    cost = v.cost_per_million
    passed = bool(cost <= limit)
    priced = (f"${hw.price_per_hour:.4g}/h ({hw.profile}, {ran_on(v)})" if hw is not None
              else f"a price per hour not recorded in the evidence ({ran_on(v)})")
    detail = (f"${cost:.4g} per 1M predictions {'within' if passed else 'exceeds'} the limit ${limit:.4g}: "
              f"Offline {v.rows_per_s:,.0f} rows/s at {priced}")
    return [GateResult("max_cost_per_million", limit, cost, passed, detail, link)]


def ran_on(v: VariantReport) -> str:
    """The provider the variant's session ran on, the device and the onnxruntime build, for a report line."""
    return ", ".join(filter(None, [v.provider, v.device or "device not recorded", v.onnxruntime]))


def _serving_gate(policy: GatePolicy, evidence: Evidence, link: str) -> GateResult:
    """The test window replayed through the serving feature path against the offline features."""
    if evidence.serving_skew is None:
        return GateResult("max_serving_skew", policy.max_serving_skew, None, False,
                          "no serving-parity evidence: the version was not replayed through the serving path", link)
    passed = bool(evidence.serving_skew <= policy.max_serving_skew)
    return GateResult("max_serving_skew", policy.max_serving_skew, evidence.serving_skew, passed,
                      f"{evidence.serving_detail} ({'within' if passed else 'exceeds'} "
                      f"{policy.max_serving_skew:.4g} of rows)", link)


def _evidence_gate(evidence: Evidence) -> GateResult:
    missing = evidence.missing
    detail = "all required evidence present" if not missing else f"missing evidence: {', '.join(missing)}"
    return GateResult("required_evidence", 0, float(len(missing)), not missing, detail, ", ".join(REQUIRED_EVIDENCE))


def _at_least(gate: str, threshold: float, measured: float, what: str, link: str) -> GateResult:
    passed = bool(measured >= threshold)
    verb = "meets" if passed else "is below"
    return GateResult(gate, threshold, measured, passed, f"{what} {measured:.4g} {verb} {threshold:.4g}", link)


def _at_most(gate: str, threshold: float, measured: float, what: str, link: str) -> GateResult:
    passed = bool(measured <= threshold)
    verb = "within" if passed else "exceeds"
    return GateResult(gate, threshold, measured, passed, f"{what} {measured:.4g} {verb} {threshold:.4g}", link)


def _champion_gates(policy: GatePolicy, evidence: Evidence, link: str) -> list[GateResult]:
    overall_gate, slice_gate = "max_regression_vs_champion", "max_slice_regression"
    if not evidence.comparisons:
        why = evidence.champion_note or "no champion yet"
        return [GateResult(overall_gate, policy.max_regression_vs_champion, None, True, why, link),
                GateResult(slice_gate, policy.max_slice_regression, None, True, why, link)]
    overall, slices = evidence.comparisons[0], evidence.comparisons[1:]
    test, margin = policy.comparison_test, policy.max_regression_vs_champion
    passed = overall.passes(margin, test)
    detail = (f"PR-AUC {overall.challenger:.4f} vs champion v{evidence.champion_version} {overall.champion:.4f}: "
              f"{_interval(overall)}{'' if passed else ' — ' + _failure(test)}")
    results = [GateResult(overall_gate, margin, overall.diff, passed, detail, link)]
    worse = [c for c in slices if not c.passes(policy.max_slice_regression, test)]
    level = f" (each at {slices[0].confidence:.2%}, {test.replace('_', '-')})" if slices else ""
    if worse:
        named = ", ".join(f"{c.scope} {c.diff:+.4f} (CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}], n={c.support})"
                          for c in worse)
        detail = f"{_failure(test)} on {len(worse)} of {len(slices)} slices{level}: {named}"
    else:
        detail = f"no regression on any of {len(slices)} slices with enough support{level}"
    bound = (lambda c: c.ci_low) if test == "non_inferiority" else (lambda c: c.ci_high)
    worst = min((bound(c) for c in slices), default=0.0)
    results.append(GateResult(slice_gate, policy.max_slice_regression, worst, not worse, detail, link))
    return results


def _interval(c: Comparison) -> str:
    return (f"diff {c.diff:+.4f}, {c.confidence:.0%} CI [{c.ci_low:+.4f}, {c.ci_high:+.4f}], "
            f"{c.support} rows resampled by {c.resampled}")


def _failure(test: str) -> str:
    return "not shown within the margin" if test == "non_inferiority" else "significantly worse"


def _baseline_gate(policy: GatePolicy, evidence: Evidence, link: str) -> list[GateResult]:
    """Challenger minus the best baseline (picked on validation) on the same test rows; only when
    gates.yaml sets min_lift_over_baseline. Evidence without baseline scores fails: nothing was shown."""
    lift = policy.min_lift_over_baseline
    if lift is None:
        return []
    c = evidence.baseline
    figures = ", ".join(f"{b['name']} {b['test_pr_auc']:.4f}" for b in evidence.baselines) or "none recorded"
    if c is None:
        return [GateResult("min_lift_over_baseline", lift, None, False,
                           f"no baseline scores in the evidence (baselines: {figures})", link)]
    passed = c.passes(-lift, policy.comparison_test)
    detail = (f"PR-AUC {c.challenger:.4f} vs {c.scope} {c.champion:.4f} (test PR-AUC of the baselines: {figures}): "
              f"{_interval(c)}{'' if passed else ' — ' + _failure(policy.comparison_test)}")
    return [GateResult("min_lift_over_baseline", lift, c.diff, passed, detail, link)]
