from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from sluicegate.gates import Evidence, GatePolicyError, VariantReport, decide, load_policy, select_variant

REPO_GATES = Path(__file__).resolve().parents[2] / "gates.yaml"


@pytest.fixture
def policy():
    return load_policy(REPO_GATES)


def variant(name="int8", **kw):
    base = dict(name=name, path=f"/m/{name}.onnx", pr_auc=0.6, roc_auc=0.95, ece=0.005, pr_auc_drop=0.001,
                max_abs_diff=1e-3, size_bytes=1000, p50_ms_batch1=0.05, p99_ms_batch1=0.2, rows_per_s=1e6)
    return VariantReport(**{**base, **kw})


def test_good_candidate_is_promoted(policy):
    decision = decide(policy, Evidence(shipped=variant(), fp32_parity=1e-6))
    assert decision.promote and not decision.failed
    assert {r.gate for r in decision.results} == set(type(policy).model_fields)


@pytest.mark.parametrize("change, gate", [
    (dict(pr_auc=0.1), "min_pr_auc"),
    (dict(ece=0.2), "max_ece"),
    (dict(pr_auc_drop=0.05), "max_quantization_drop"),
    (dict(p99_ms_batch1=50.0), "max_p99_latency_ms"),
])
def test_each_gate_blocks_with_its_reason(policy, change, gate):
    decision = decide(policy, Evidence(shipped=variant(**change), fp32_parity=1e-6))
    assert not decision.promote
    assert [r.gate for r in decision.failed] == [gate]
    assert gate in decision.reason()


def test_parity_gate(policy):
    decision = decide(policy, Evidence(shipped=variant(), fp32_parity=0.5))
    assert [r.gate for r in decision.failed] == ["parity_tolerance"]


def test_worse_than_champion_is_blocked(policy):
    decision = decide(policy, Evidence(shipped=variant(pr_auc=0.55), fp32_parity=1e-6,
                                       champion_version="4", champion_pr_auc=0.60))
    assert not decision.promote
    assert "champion v4" in decision.reason()
    better = decide(policy, Evidence(shipped=variant(pr_auc=0.62), fp32_parity=1e-6,
                                     champion_version="4", champion_pr_auc=0.60))
    assert better.promote


def test_report_lists_every_gate(policy):
    decision = decide(policy, Evidence(shipped=variant(ece=0.3), fp32_parity=1e-6))
    md = decision.to_markdown()
    assert "BLOCKED" in md and "**FAIL**" in md and md.count("\n| ") == len(decision.results) + 1
    assert decision.to_dict()["gates"][1]["gate"] == "max_ece"


def test_select_fastest_variant_within_tolerance(policy):
    fp32 = variant("fp32", p50_ms_batch1=0.08, pr_auc_drop=0.0, max_abs_diff=1e-7)
    int8 = variant("int8", p50_ms_batch1=0.04)
    assert select_variant([fp32, int8], policy).name == "int8"
    lossy = replace(int8, pr_auc_drop=0.02)
    assert select_variant([fp32, lossy], policy).name == "fp32"


def test_incomplete_policy_is_a_clear_error(tmp_path):
    raw = yaml.safe_load(REPO_GATES.read_text())
    raw.pop("max_ece")
    raw["min_accuracy"] = 0.9
    bad = tmp_path / "gates.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(GatePolicyError) as err:
        load_policy(bad)
    assert "missing gate 'max_ece'" in str(err.value) and "unknown gate 'min_accuracy'" in str(err.value)


def test_missing_policy_file(tmp_path):
    with pytest.raises(GatePolicyError, match="not found"):
        load_policy(tmp_path / "nope.yaml")
