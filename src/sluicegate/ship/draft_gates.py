"""A first gate policy for a new table, from that table's own figures.

`sluicegate init` drafts it beside the spec: the quality floors come from the label rate (a PR-AUC at
the label rate is chance) and from the two baselines fitted on the table's own split, the slice minimums
from the size of its test window; everything else is the project's policy. Each key carries a comment
saying where its number came from, so a reviewer can judge it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from sluicegate.features.inputs import cardinalities
from sluicegate.policy import GatePolicy, load_policy
from sluicegate.ship import baselines, evaluate
from sluicegate.spec import DatasetSpec, load_spec

CHANCE_MULTIPLE = 2.0  # a model must rank at least this many times better than chance
BASELINE_SHARE = 0.8  # ... and reach this share of the weaker baseline's test PR-AUC
MIN_ECE, ECE_MULTIPLE = 0.02, 2.0  # calibration: twice the better-calibrated baseline's ECE, at least MIN_ECE
SLICE_SHARE = 0.1  # a slice is gated when it holds this share of the test window (at most the project's minimum)


@dataclass
class Figures:
    """What the draft is computed from."""

    label_rate: float
    test_rows: int
    test_positives: int
    baselines: list[dict]  # name, valid_pr_auc, test_pr_auc, test_ece


def measure(frame: pd.DataFrame, spec: DatasetSpec) -> Figures:
    """Split the table as training will and fit the baselines on its raw features (the draft spec has no
    aggregates; with them, the baselines would see fewer inputs than the model)."""
    from sluicegate.train.stages import prepare  # torch is loaded only when a draft is asked for

    prepared = prepare(frame, spec)
    fitted = baselines.fit_baselines(prepared.train, prepared.y_train, prepared.valid, prepared.y_valid,
                                     prepared.test, prepared.y_test, cardinalities(spec))
    rows = [b.to_dict() | {"test_ece": evaluate.expected_calibration_error(prepared.y_test, b.test_scores)}
            for b in fitted]
    y = spec.positive(frame[spec.label]).to_numpy()
    return Figures(float(y.mean()), len(prepared.y_test), int(prepared.y_test.sum()), rows)


def draft(figures: Figures, project: GatePolicy) -> dict[str, tuple[object, str]]:
    """key -> (value, where it came from) for the keys this table sets itself."""
    weaker = min(figures.baselines, key=lambda b: b["test_pr_auc"])
    calibrated = min(figures.baselines, key=lambda b: b["test_ece"])
    chance = CHANCE_MULTIPLE * figures.label_rate
    floor = BASELINE_SHARE * weaker["test_pr_auc"]
    support = int(min(project.min_slice_support, max(50, SLICE_SHARE * figures.test_rows)))
    positives = int(min(project.min_slice_positives, max(5, SLICE_SHARE * figures.test_positives)))
    return {
        "min_pr_auc": (_round(max(chance, floor)),
                       f"the larger of {CHANCE_MULTIPLE:g} x the label rate {figures.label_rate:.4f} (chance PR-AUC) "
                       f"and {BASELINE_SHARE:.0%} of the weaker baseline ({weaker['name']}, test PR-AUC "
                       f"{weaker['test_pr_auc']:.4f})"),
        "max_ece": (_round(max(MIN_ECE, ECE_MULTIPLE * calibrated["test_ece"])),
                    f"{ECE_MULTIPLE:g} x the better-calibrated baseline's ECE ({calibrated['name']}, "
                    f"{calibrated['test_ece']:.4f}), at least {MIN_ECE:g}"),
        "min_lift_over_baseline": (0.0, "block a candidate shown worse than the better baseline on validation; "
                                        "baselines' test PR-AUC: " + ", ".join(
                                            f"{b['name']} {b['test_pr_auc']:.4f}" for b in figures.baselines)),
        "min_slice_support": (support, f"{SLICE_SHARE:.0%} of the {figures.test_rows:,}-row test window, at least "
                                       f"50, at most the project's {project.min_slice_support}"),
        "min_slice_positives": (positives, f"{SLICE_SHARE:.0%} of the test window's {figures.test_positives:,} "
                                           f"positives, at least 5, at most the project's "
                                           f"{project.min_slice_positives}"),
    }


def _round(value: float) -> float:
    """Three significant digits, rounded down: a floor never ends above the figure it came from."""
    if value <= 0:
        return 0.0
    scale = 10 ** (2 - math.floor(math.log10(value)))
    return float(np.floor(value * scale) / scale)


def render(own: dict[str, tuple[object, str]], project: GatePolicy, source: Path) -> str:
    """The whole policy as YAML: this table's keys with their reasons, the rest as the project's."""
    lines = [f"# Drafted by `sluicegate init` from this table's own figures; the rest is {source}.",
             "# Review every number before the first run; docs/gates.md explains each gate.", ""]
    values = project.model_dump(exclude_none=True)
    drift = values.pop("drift")
    for key, value in values.items():
        if key in own:
            value, why = own[key]
            lines.append(f"# {why}")
        lines.append(yaml.safe_dump({key: value}, default_flow_style=False).strip())
    for key in own.keys() - values.keys():
        value, why = own[key]
        lines += [f"# {why}", yaml.safe_dump({key: value}).strip()]
    lines.append(yaml.safe_dump({"drift": drift}, sort_keys=False).strip())
    return "\n".join(lines) + "\n"


def draft_gates(frame: pd.DataFrame, spec: DatasetSpec, project_gates: Path) -> tuple[str, Figures]:
    """The drafted gates file's text, and the figures it was drafted from."""
    project = load_policy(project_gates)
    figures = measure(frame, spec)
    return render(draft(figures, project), project, project_gates), figures


def gates_file(spec_name: str) -> str:
    """The drafted gates' file name, beside the spec: named after the spec's `name`, not its file."""
    return f"{spec_name}.gates.yaml"


def write_draft(table: Path, spec_path: Path, project_gates: Path) -> str:
    """Draft the gates of the table `spec_path` describes (the spec names them already) and say what was set."""
    from sluicegate.data.tables import conform, read_table

    spec = load_spec(spec_path)
    text, figures = draft_gates(conform(read_table(table), spec, str(table)), spec, project_gates)
    out = spec_path.parent / (spec.gates or gates_file(spec.name))
    out.write_text(text)
    fitted = ", ".join(f"{b['name']} {b['test_pr_auc']:.4f}" for b in figures.baselines)
    return (f"gates: wrote {out} from a label rate of {figures.label_rate:.2%} and the baselines' test PR-AUC "
            f"({fitted}); review it before the first run")
