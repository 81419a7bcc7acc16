"""The baselines on the candidate's split, and the gate that compares the candidate with the best of them."""

from pathlib import Path

import numpy as np
import pytest

from sluicegate.config import Settings
from sluicegate.policy import load_policy
from sluicegate.runtime import ModelInput
from sluicegate.ship.baselines import best, fit_baselines
from sluicegate.ship.evaluate import paired_bootstrap
from sluicegate.ship.gates import Evidence, VariantReport, decide
from sluicegate.ship.holdout import BASELINE_PREFIX, lift_over_baseline
from sluicegate.spec import load_spec

REPO_GATES = Path(__file__).resolve().parents[3] / "gates.yaml"


def _table(rng, n):
    """An interaction of two inputs and one category decides the label: trees see it, a linear model less."""
    numeric = rng.normal(size=(n, 4)).astype(np.float32)
    categorical = rng.integers(0, 6, (n, 1))
    logit = 2.5 * numeric[:, 0] * numeric[:, 1] + 1.5 * (categorical[:, 0] == 2) + 0.8 * numeric[:, 2] - 3.5
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    return ModelInput(numeric, categorical), y


@pytest.fixture(scope="module")
def fitted():
    rng = np.random.default_rng(0)
    (train, y_train), (valid, y_valid), (test, y_test) = (_table(rng, n) for n in (6000, 2000, 3000))
    return fit_baselines(train, y_train, valid, y_valid, test, y_test, [7]), y_test


def test_both_baselines_are_fitted_and_scored_on_the_same_rows(fitted):
    baselines, y_test = fitted
    assert [b.name for b in baselines] == ["logistic_regression", "hist_gradient_boosting"]
    for b in baselines:
        assert len(b.test_scores) == len(y_test) and 0 < b.valid_pr_auc < 1 and 0 < b.test_pr_auc < 1
    lr, hgb = baselines
    assert hgb.valid_pr_auc > lr.valid_pr_auc + 0.1  # the interaction is beyond a linear model
    assert best(baselines) == best([b.to_dict() for b in baselines]) == "hist_gradient_boosting"


def _evidence(comparison, baselines) -> Evidence:
    shipped = VariantReport(name="fp32", path="m.onnx", provider="CPUExecutionProvider", pr_auc=0.6, roc_auc=0.9,
                            ece=0.005, pr_auc_drop=0.0, roc_auc_drop=0.0, max_abs_diff=1e-7, size_bytes=1,
                            p50_ms_batch1=0.05, p90_ms_batch1=0.08, p99_ms_batch1=0.2, server_p99_ms=0.4,
                            rows_per_s=1e6, memory_mb=3.0, cost_per_million=0.0001)
    return Evidence(shipped=shipped, fp32_parity=1e-7, robustness_worst=0.0, behaviour_violation_rate=0.0,
                    baseline=comparison, baselines=[b.to_dict() for b in baselines])


def _lift_gate(policy, comparison, baselines):
    decision = decide(policy, _evidence(comparison, baselines))
    return next(r for r in decision.results if r.gate == "min_lift_over_baseline"), decision


def test_a_candidate_worse_than_the_baseline_is_blocked(fitted):
    import pandas as pd

    policy = load_policy(REPO_GATES)
    baselines, y = fitted
    hgb = best(baselines)
    spec = load_spec(Settings().spec_path)
    holdout = pd.DataFrame({spec.label: y, **{BASELINE_PREFIX + b.name: b.test_scores for b in baselines}})
    reference = holdout[BASELINE_PREFIX + hgb].to_numpy()
    rng = np.random.default_rng(1)
    worse = reference + rng.normal(0, 0.3, len(y))  # the baseline's ranking, blurred
    comparison = lift_over_baseline(worse, holdout, spec, policy, hgb)
    gate, decision = _lift_gate(policy, comparison, baselines)
    assert comparison.scope == f"baseline {hgb}" and comparison.ci_high < 0
    assert not gate.passed and not decision.promote and "significantly worse" in gate.detail
    assert "logistic_regression" in gate.detail and "hist_gradient_boosting" in gate.detail
    better = paired_bootstrap(y.astype(float), reference, reference + y * 0.5, 100, 0.95, scope=f"baseline {hgb}")
    assert _lift_gate(policy, better, baselines)[0].passed


def test_evidence_without_baseline_scores_fails_the_gate_and_no_key_means_no_gate(fitted):
    baselines, _ = fitted
    policy = load_policy(REPO_GATES)
    gate, _ = _lift_gate(policy, None, baselines)
    assert not gate.passed and "no baseline scores" in gate.detail
    unset = policy.model_copy(update={"min_lift_over_baseline": None})
    assert "min_lift_over_baseline" not in {r.gate for r in decide(unset, _evidence(None, baselines)).results}


def test_a_large_training_window_is_sampled_to_bound_the_baselines_cost(monkeypatch):
    from sluicegate.ship import baselines

    monkeypatch.setattr(baselines, "MAX_TRAIN_ROWS", 1000)
    inputs, y = _table(np.random.default_rng(2), 5000)
    sampled, y_sampled = baselines._sample(inputs, y, seed=0)
    assert len(y_sampled) == len(sampled.numeric) == 1000
    again, _ = baselines._sample(inputs, y, seed=0)
    np.testing.assert_array_equal(sampled.numeric, again.numeric)  # seeded: the same rows every run
    small, _ = baselines._sample(inputs.take(np.arange(800)), y[:800], seed=0)
    assert len(small.numeric) == 800
