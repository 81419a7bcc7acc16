"""A new table's first gates, drafted from its own label rate and baselines."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sluicegate.data.tables import infer_spec
from sluicegate.policy import load_policy
from sluicegate.ship.draft_gates import gates_file, write_draft

REPO_GATES = Path(__file__).resolve().parents[3] / "gates.yaml"


@pytest.fixture(scope="module")
def drafted(tmp_path_factory):
    """A table with 6% positives, its drafted spec naming its gates, and the gates `write_draft` wrote."""
    root = tmp_path_factory.mktemp("table")
    rng = np.random.default_rng(0)
    n = 4000
    frame = pd.DataFrame({f"x{i}": rng.normal(size=n) for i in range(4)})
    frame["kind"] = rng.choice(["a", "b", "c"], n)
    logit = 1.2 * frame["x0"] - 0.8 * frame["x1"] + (frame["kind"] == "b") - 3.3
    frame["outcome"] = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "yes", "no")
    table = root / "table.csv"
    frame.to_csv(table, index=False)
    draft = infer_spec(frame, "table", label="outcome")
    spec_path = root / "table.spec.yaml"
    draft.spec["gates"] = gates_file(draft.spec["name"])
    spec_path.write_text(draft.to_yaml(table))
    said = write_draft(table, spec_path, REPO_GATES)
    return (frame["outcome"] == "yes").mean(), root / "table.gates.yaml", said


def test_the_draft_is_a_complete_policy_with_the_tables_own_floors(drafted):
    rate, path, said = drafted
    policy, project = load_policy(path), load_policy(REPO_GATES)
    assert 2 * rate * 0.99 <= policy.min_pr_auc < 1  # at least twice chance
    assert policy.min_lift_over_baseline == 0.0 and policy.max_ece >= 0.02
    assert policy.min_slice_support <= project.min_slice_support
    assert policy.latency_slo_p99_ms == project.latency_slo_p99_ms and policy.drift == project.drift
    assert "logistic_regression" in said and "hist_gradient_boosting" in said and str(path) in said


def test_each_drafted_number_says_where_it_came_from(drafted):
    _, path, _ = drafted
    lines = path.read_text().splitlines()
    for key in ("min_pr_auc", "max_ece", "min_lift_over_baseline", "min_slice_support", "min_slice_positives"):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:"))
        assert lines[at - 1].startswith("# ") and len(lines[at - 1]) > 30, key
    assert "label rate" in path.read_text() and "np.float64" not in path.read_text()
    assert yaml.safe_load(path.read_text())["comparison_test"] in ("not_shown_worse", "non_inferiority")
