from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from sluicegate.hardware import Hardware
from sluicegate.policy import GatePolicyError, load_policy
from sluicegate.ship.evaluate import Comparison, compare_with_champion
from sluicegate.ship.gates import (
    Evidence,
    GateDecision,
    VariantReport,
    decide,
    select_variant,
)

REPO_GATES = Path(__file__).resolve().parents[3] / "gates.yaml"


@pytest.fixture
def policy():
    return load_policy(REPO_GATES)


def variant(name="int8", **kw):
    base = dict(name=name, path=f"/m/{name}.onnx", provider="CPUExecutionProvider", pr_auc=0.6, roc_auc=0.95,
                ece=0.005, pr_auc_drop=0.001, roc_auc_drop=0.0005, max_abs_diff=1e-3, size_bytes=1000,
                p50_ms_batch1=0.05, p90_ms_batch1=0.08, p99_ms_batch1=0.2, server_p99_ms=0.4, rows_per_s=1e6,
                memory_mb=3.0, cost_per_million=0.0001)
    return VariantReport(**{**base, **kw})


def evidence(**kw):
    above_baseline = Comparison("baseline hist_gradient_boosting", 5000, 100, 0.5, 0.6, 0.1, 0.05, 0.15)
    base = dict(shipped=variant(), fp32_parity=1e-6, robustness_worst=0.01, behaviour_violation_rate=0.0,
                baseline=above_baseline, serving_skew=0.0, serving_detail="every feature equal on all 5,000 rows")
    return Evidence(**{**base, **kw})


def test_good_candidate_is_promoted_and_every_gate_is_listed(policy):
    decision = decide(policy, evidence())
    assert decision.promote and not decision.failed
    listed = {r.gate for r in decision.results}
    gated = {"min_pr_auc", "max_ece", "max_quantization_drop", "parity_tolerance", "max_robustness_drop",
             "max_behaviour_violation_rate", "latency_slo_p99_ms", "max_cost_per_million",
             "max_regression_vs_champion", "max_slice_regression", "min_lift_over_baseline", "required_evidence",
             "max_serving_skew"}
    assert listed == gated


@pytest.mark.parametrize("change, gate", [
    (dict(shipped=variant(pr_auc=0.1)), "min_pr_auc"),
    (dict(shipped=variant(ece=0.2)), "max_ece"),
    (dict(shipped=variant(pr_auc_drop=0.05)), "max_quantization_drop"),
    (dict(fp32_parity=0.5), "parity_tolerance"),
    (dict(robustness_worst=0.3), "max_robustness_drop"),
    (dict(behaviour_violation_rate=0.2), "max_behaviour_violation_rate"),
    (dict(missing=["holdout.parquet"]), "required_evidence"),
    (dict(serving_skew=0.3, serving_detail="cust_txn_count_24h differs on 30.00% of 5,000 rows"), "max_serving_skew"),
    (dict(serving_skew=None), "max_serving_skew"),  # a version never replayed through the serving path
])
def test_each_gate_blocks_with_its_reason(policy, change, gate):
    decision = decide(policy, evidence(**change))
    assert not decision.promote
    assert [r.gate for r in decision.failed] == [gate]
    assert gate in decision.reason()


def test_latency_slo_blocks_a_slow_variant(policy):
    decision = decide(policy, evidence(shipped=variant(server_p99_ms=policy.latency_slo_p99_ms * 3)))
    assert [r.gate for r in decision.failed] == ["latency_slo_p99_ms"]
    assert "Server-scenario p99" in decision.reason()


CPU_2CORE = Hardware(target="cpu", provider="CPUExecutionProvider", profile="cpu-2core", price_per_hour=0.085)


def test_the_shipped_policy_sets_a_cost_limit_well_above_what_the_benchmark_measures(policy):
    from sluicegate.ship.benchmark import cost_per_million

    # The MLP's Offline throughput on the 2-core VM (bench/RESULTS.md: ~0.84M rows/s) and the
    # FT-Transformer's (~10k rows/s), priced as cpu-2core.
    assert policy.max_cost_per_million is not None
    assert cost_per_million(840_000, 0.085) * 1000 < policy.max_cost_per_million
    assert cost_per_million(10_000, 0.085) * 10 < policy.max_cost_per_million


def test_cost_gate_passes_under_the_limit_and_says_what_it_was_priced_at(policy):
    cost = 0.085 / (800_000 * 3600) * 1e6
    decision = decide(policy, evidence(shipped=variant(rows_per_s=800_000, cost_per_million=cost),
                                       hardware=CPU_2CORE), links={"benchmark": "evidence/benchmark.json"})
    assert decision.promote, decision.reason()
    (gate,) = [r for r in decision.results if r.gate == "max_cost_per_million"]
    assert gate.passed and gate.measured == cost and gate.threshold == policy.max_cost_per_million
    assert gate.detail == (f"${cost:.4g} per 1M predictions within the limit ${policy.max_cost_per_million:.4g}: "
                           "Offline 800,000 rows/s at $0.085/h (cpu-2core, CPUExecutionProvider, "
                           "device not recorded)")
    assert gate.evidence == "evidence/benchmark.json"


def test_cost_gate_blocks_an_expensive_variant_naming_the_figure(policy):
    h100 = Hardware(target="cuda", provider="CUDAExecutionProvider", profile="nvidia-h100", price_per_hour=4.0)
    cost = 4.0 / (2_000 * 3600) * 1e6  # $0.556 per 1M at 2,000 rows/s
    shipped = variant(rows_per_s=2_000, cost_per_million=cost, provider="CUDAExecutionProvider")
    decision = decide(policy, evidence(shipped=shipped, hardware=h100))
    assert not decision.promote
    assert [r.gate for r in decision.failed] == ["max_cost_per_million"]
    reason = decision.reason()
    assert "max_cost_per_million: $0.5556 per 1M predictions exceeds the limit $0.1" in reason
    assert "Offline 2,000 rows/s at $4/h (nvidia-h100, CUDAExecutionProvider, device not recorded)" in reason


def test_latency_and_cost_lines_name_the_provider_the_device_and_the_onnxruntime_build(policy):
    ran = variant(device="AMD EPYC 7B13, 2 cores", onnxruntime="onnxruntime 1.31.1 (CPU build)")
    decision = decide(policy, evidence(shipped=ran, hardware=CPU_2CORE))
    lines = {r.gate: r.detail for r in decision.results}
    where = "CPUExecutionProvider, AMD EPYC 7B13, 2 cores, onnxruntime 1.31.1 (CPU build)"
    assert f"q/s on {where}" in lines["latency_slo_p99_ms"]
    assert f"(cpu-2core, {where})" in lines["max_cost_per_million"]


def test_cost_gate_without_a_recorded_price_says_so(policy):
    decision = decide(policy, evidence(shipped=variant(cost_per_million=1.0)))
    (gate,) = decision.failed
    assert gate.gate == "max_cost_per_million" and "price per hour not recorded" in gate.detail


def test_no_cost_limit_means_no_cost_gate(policy):
    unlimited = policy.model_copy(update={"max_cost_per_million": None})
    decision = decide(unlimited, evidence(shipped=variant(cost_per_million=1e6)))
    assert decision.promote and "max_cost_per_million" not in {r.gate for r in decision.results}


def test_the_cost_gate_reads_the_price_from_the_evidence_of_the_version(policy):
    from dataclasses import asdict

    from sluicegate.ship.promote import _evidence

    raw = {"shipped": asdict(variant(cost_per_million=0.5)), "fp32_parity": 1e-6, "robustness": {"noise": 0.01},
           "behaviour": {"behaviour_violation_rate": 0.0}, "hardware": asdict(CPU_2CORE),
           "serving": {"skew": 0.0, "detail": "every feature equal on all 5,000 replayed test rows"}}
    decision = decide(policy.model_copy(update={"min_lift_over_baseline": None}), _evidence(raw, [], None, []))
    assert [r.gate for r in decision.failed] == ["max_cost_per_million"]
    assert "$0.085/h (cpu-2core" in decision.reason()


def _scores(rng, y, quality):
    """Scores whose ranking quality grows with `quality`."""
    return 1 / (1 + np.exp(-(quality * (y - 0.5) * 2 + rng.normal(0, 1, len(y)))))


@pytest.fixture
def labelled():
    rng = np.random.default_rng(0)
    n = 20_000
    y = (rng.random(n) < 0.05).astype(float)
    groups = {"channel": np.where(rng.random(n) < 0.15, "atm", "pos")}
    return rng, y, groups


def test_better_challenger_passes_the_champion_gates(policy, labelled):
    rng, y, groups = labelled
    comps = compare_with_champion(y, _scores(rng, y, 1.0), _scores(rng, y, 1.5), groups, 200, 0.95, 500, 20)
    decision = decide(policy, evidence(comparisons=comps, champion_version="3"))
    assert decision.promote, decision.reason()
    assert comps[0].diff > 0 and comps[0].ci_low > 0


def test_slightly_worse_challenger_is_blocked_with_the_reason(policy, labelled):
    rng, y, groups = labelled
    champion = _scores(rng, y, 1.5)
    challenger = champion + rng.normal(0, 0.35, len(y))  # the same model, degraded a little
    comps = compare_with_champion(y, champion, challenger, groups, 200, 0.95, 500, 20)
    decision = decide(policy, evidence(comparisons=comps, champion_version="3"))
    assert not decision.promote
    assert "max_regression_vs_champion" in [r.gate for r in decision.failed]
    assert "significantly worse" in decision.reason() and "champion v3" in decision.reason()


def test_slice_regression_blocks_even_when_overall_improves(policy, labelled):
    rng, y, groups = labelled
    champion = _scores(rng, y, 1.5)
    challenger = _scores(rng, y, 3.0)
    atm = groups["channel"] == "atm"
    challenger[atm] = _scores(rng, y[atm], 0.0)  # no signal at all on ATM transactions
    comps = compare_with_champion(y, champion, challenger, groups, 200, 0.95, 500, 20)
    decision = decide(policy, evidence(comparisons=comps, champion_version="3"))
    assert comps[0].diff > 0  # better overall
    assert [r.gate for r in decision.failed] == ["max_slice_regression"]
    assert "channel=atm" in decision.reason()


def test_report_lists_every_gate_with_evidence(policy):
    decision = decide(policy, evidence(shipped=variant(ece=0.3)), links={"calibration": "reliability.png"})
    md = decision.to_markdown()
    assert "BLOCKED" in md and "**FAIL**" in md and md.count("\n| ") == len(decision.results) + 1
    assert "reliability.png" in md
    assert GateDecision.from_dict(decision.to_dict()).to_markdown() == md


def test_select_fastest_variant_within_tolerance(policy):
    fp32 = variant("fp32", rows_per_s=5e5, pr_auc_drop=0.0, max_abs_diff=1e-7)
    int8 = variant("int8", rows_per_s=8e5)
    assert select_variant([fp32, int8], policy).name == "int8"
    lossy = replace(int8, pr_auc_drop=0.02)
    assert select_variant([fp32, lossy], policy).name == "fp32"


def test_the_variant_is_chosen_on_the_validation_window(policy):
    """What the test window says of a variant grades the choice; it does not make it."""
    fp32 = variant("fp32", rows_per_s=5e5, pr_auc_drop=0.0, valid_pr_auc_drop=0.0, max_abs_diff=1e-7)
    lucky = variant("int8", rows_per_s=8e5, pr_auc_drop=0.0, valid_pr_auc_drop=0.02)  # lossy on validation
    assert select_variant([fp32, lucky], policy).name == "fp32"
    unlucky = replace(lucky, pr_auc_drop=0.02, valid_pr_auc_drop=0.0)
    chosen = select_variant([fp32, unlucky], policy)
    assert chosen.name == "int8"
    assert "max_quantization_drop" in [r.gate for r in decide(policy, evidence(shipped=chosen)).failed]


def test_incomplete_policy_is_a_clear_error(tmp_path):
    raw = yaml.safe_load(REPO_GATES.read_text())
    raw.pop("max_ece")
    raw["min_accuracy"] = 0.9
    bad = tmp_path / "gates.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(GatePolicyError) as err:
        load_policy(bad)
    assert "missing gate 'max_ece'" in str(err.value) and "unknown gate 'min_accuracy'" in str(err.value)


def test_out_of_range_threshold_is_an_error(tmp_path):
    raw = yaml.safe_load(REPO_GATES.read_text())
    raw["confidence"] = 1.5
    bad = tmp_path / "gates.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(GatePolicyError, match="confidence"):
        load_policy(bad)


def test_missing_policy_file(tmp_path):
    with pytest.raises(GatePolicyError, match="not found"):
        load_policy(tmp_path / "nope.yaml")


def test_drift_block_is_validated(tmp_path):
    raw = yaml.safe_load(REPO_GATES.read_text())
    assert load_policy(REPO_GATES).drift.psi_retrain == raw["drift"]["psi_retrain"]
    raw["drift"]["psi_retrian"] = 0.3
    bad = tmp_path / "gates.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(GatePolicyError, match="unknown gate 'drift.psi_retrian'"):
        load_policy(bad)


@pytest.mark.parametrize("value, says", [("cheap", "valid number"), (-0.5, "greater than 0"), (0, "greater than 0")])
def test_a_bad_cost_limit_is_an_error_naming_the_key(tmp_path, value, says):
    raw = yaml.safe_load(REPO_GATES.read_text())
    raw["max_cost_per_million"] = value
    bad = tmp_path / "gates.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(GatePolicyError, match=f"'max_cost_per_million': .*{says}"):
        load_policy(bad)


def test_the_cost_limit_is_optional(tmp_path):
    raw = yaml.safe_load(REPO_GATES.read_text())
    raw.pop("max_cost_per_million")
    policy_file = tmp_path / "gates.yaml"
    policy_file.write_text(yaml.safe_dump(raw))
    assert load_policy(policy_file).max_cost_per_million is None
