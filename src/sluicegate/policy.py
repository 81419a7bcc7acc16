"""The promotion policy: the schema of gates.yaml, its `drift:` block included.

Read once per run; the gates (ship) and the monitor (operate) take the parsed policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class GatePolicyError(ValueError):
    """gates.yaml is missing, incomplete or names an unknown gate."""


class DriftThresholds(BaseModel):
    """The `drift:` block of gates.yaml. Monitoring reads it; defaults apply when the block is absent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    psi_warn: float = Field(0.1, gt=0, description="PSI above which a feature is reported as drifting")
    psi_retrain: float = Field(0.25, gt=0, description="PSI of any feature that triggers a retrain")
    score_psi_retrain: float = Field(0.25, gt=0, description="PSI of the score that triggers a retrain")
    min_recall: float = Field(0.5, ge=0, le=1, description="Live recall on late labels below which we retrain "
                              "(when its exact binomial upper bound at 1 - false_alarm_rate is below it too)")
    max_estimated_drop: float = Field(0.2, ge=0, le=1, description="Retrain when a version's CBPE estimate of "
                                      "precision or recall falls below its band and this far below what the "
                                      "reference's windows of the same size expect")
    cooldown_hours: float = Field(6.0, ge=0, description="At most one triggered retrain per this many hours")
    min_rows: int = Field(500, ge=1, description="Fewer logged rows than this: report, never trigger")
    false_alarm_rate: float = Field(0.001, gt=0, lt=1, description="Chance that a window of a steady world crosses "
                                    "any column's alert level; each level is calibrated on reference windows of "
                                    "the live window's size, psi_warn and psi_retrain its floors")
    max_blocked_retrains: int = Field(3, ge=0, description="After this many retrains in a row blocked by a gate, "
                                      "trigger no more until reset; 0: no limit")


class GatePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_pr_auc: float = Field(ge=0, le=1)
    max_ece: float = Field(ge=0, le=1)
    max_quantization_drop: float = Field(ge=0)
    parity_tolerance: float = Field(gt=0)
    max_robustness_drop: float = Field(ge=0)
    max_behaviour_violation_rate: float = Field(ge=0, le=1)
    latency_slo_p99_ms: float = Field(gt=0)
    slo_target_qps: float = Field(gt=0)
    # USD per million predictions at the Offline throughput and the hardware profile's price per hour;
    # absent (None): no cost gate.
    max_cost_per_million: float | None = Field(None, gt=0)
    # Largest share of test rows on which any feature served by the online path differs from the offline
    # value training used (the serving-parity replay).
    max_serving_skew: float = Field(ge=0, le=1)
    max_regression_vs_champion: float = Field(ge=0)
    # How a paired comparison (champion, slices, baseline) passes: non_inferiority, the interval's low end
    # above -margin (the candidate must show it is no worse); not_shown_worse, its high end above -margin
    # (only a candidate shown worse fails). docs/gates.md gives the reasons for the default.
    comparison_test: Literal["non_inferiority", "not_shown_worse"] = "not_shown_worse"
    # The candidate's PR-AUC minus the best baseline's (logistic regression, HistGradientBoosting, picked on
    # validation) on the same test rows, under comparison_test; absent (None): no baseline gate.
    min_lift_over_baseline: float | None = Field(None, ge=-1, le=1)
    max_slice_regression: float = Field(ge=0)
    min_slice_support: int = Field(ge=1)
    min_slice_positives: int = Field(ge=1)
    bootstrap_samples: int = Field(ge=50)
    confidence: float = Field(gt=0.5, lt=1)
    drift: DriftThresholds = Field(default_factory=DriftThresholds)


def load_policy(path: Path) -> GatePolicy:
    """Read gates.yaml, failing before any work with what is wrong in it."""
    if not path.exists():
        raise GatePolicyError(f"gate policy {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise GatePolicyError(f"{path}: expected a mapping of gate names to thresholds")
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
