"""The model card of a version, generated from its evidence and gate decision."""

from __future__ import annotations

from dataclasses import fields

from sluicegate.hardware import Hardware
from sluicegate.ship.gates import GateDecision, VariantReport


def render(name: str, version: str, tags: dict, evidence: dict, decision: GateDecision) -> str:
    shipped = evidence["shipped"]
    torch_metrics, metrics = evidence["torch_metrics"], evidence["shipped_metrics"]
    dataset = evidence.get("dataset", {})
    lines = [
        f"# Model card: {name} v{version}",
        "",
        "## Intended use",
        f"Predicts {dataset.get('predicts', 'the positive class')} for rows of the `{dataset.get('name', '?')}` "
        f"table: the probability that `{dataset.get('label', 'label')}` is `{dataset.get('positive', '?')}`. "
        "The score is a calibrated probability; the decision threshold chosen on the validation split is "
        f"{evidence['threshold']:.4f}. Meant to rank rows for a human or a downstream rule, not to decide alone.",
        "",
        "## Training data",
        f"- batch: `{tags.get('batch_id', 'unknown')}`; data hash `{tags.get('data_hash', 'unknown')}`",
        f"- model spec (the spec's model-relevant part) hash `{tags.get('spec_hash', 'unknown')}`",
        f"- training window: {tags.get('train_window', 'unknown')}; test window: {tags.get('test_window', 'unknown')}",
        f"- split: {tags.get('split', 'unknown')}",
        f"- feature service: `{tags.get('feature_service', 'unknown')}`; code: `{tags.get('git_commit', 'unknown')}`",
        f"- features: {', '.join(evidence.get('features', []))}",
        "",
        "## Metrics (test window)",
        "| model | PR-AUC | ROC-AUC | precision | recall | F1 | ECE |",
        "|---|---|---|---|---|---|---|",
        _metric_row("torch", torch_metrics),
        _metric_row(f"shipped ({shipped['name']})", metrics),
        "",
        "## Baselines (same split and inputs, scikit-learn defaults)",
        "| model | validation PR-AUC | test PR-AUC |",
        "|---|---|---|",
        *[f"| {b['name']} | {_f(b['valid_pr_auc'])} | {_f(b['test_pr_auc'])} |" for b in evidence.get("baselines", [])],
        f"| shipped ({shipped['name']}) | | {_f(metrics['pr_auc'])} |",
        "",
        "## Metrics per slice (shipped variant)",
        "| slice | value | support | positives | PR-AUC | recall | trusted |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['slice']} | {r['value']} | {r['support']} | {r['positives']} | {_f(r['pr_auc'])} | "
          f"{_f(r['recall'])} | {'yes' if r['trusted'] else 'no'} |" for r in evidence["slices"]],
        "",
        "## Calibration",
        f"ECE {metrics['ece']:.4f} over 15 bins; reliability diagram: `reliability.png`.",
        "",
        "## Robustness and behaviour",
        *[f"- PR-AUC drop, {k.replace('_', ' ')}: {v:+.4f}" for k, v in evidence["robustness"].items()],
        *[f"- {c['kind']} `{c['what']}`: violation rate {c['violation_rate']:.4f}, mean score change "
          f"{c['mean_delta']:+.4f}" for c in evidence["behaviour"].get("checks", [])],
        "",
        "## Benchmark (MLPerf Inference scenarios)",
        _hardware_line(evidence),
        "",
        "| variant | provider (as run) | scenario | batch | p50 ms | p90 ms | p99 ms | samples/s | $ per 1M |",
        "|---|---|---|---|---|---|---|---|---|",
        *[f"| {r['variant']} | {r['provider']} | {r['scenario']} | {r['batch_size']} | {r['p50_ms']:.3f} | "
          f"{r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['samples_per_s']:,.0f} | {r['cost_per_million']:.4f} |"
          for r in evidence["benchmark"]],
        "",
        "## Limitations",
        "- Trained on one data window; the world shifts, so drift is monitored and the model retrained.",
        _serving_line(evidence),
        "- Slices with fewer than the policy's minimum support are reported but not gated.",
        "- Label-based features use only labels known `label_delay` before the event.",
        "",
        "## Gate results",
        decision.to_markdown(title=f"{name} v{version}").split("\n", 2)[2],
    ]
    return "\n".join(lines) + "\n"


def _hardware_line(evidence: dict) -> str:
    """Where the figures were measured: the session's provider, the device and the onnxruntime build."""
    hw, shipped = evidence.get("hardware") or {}, evidence["shipped"]
    ran = VariantReport(**{f.name: shipped[f.name] for f in fields(VariantReport) if f.name in shipped})
    recorded = Hardware(**{f.name: hw[f.name] for f in fields(Hardware) if f.name in hw}) if hw else None
    return (f"Measured on {ran.provider or (recorded.provider if recorded else '?')} "
            f"({ran.device or (recorded.device if recorded else '') or 'device not recorded'}; "
            f"{ran.onnxruntime or (recorded.onnxruntime if recorded else '') or 'onnxruntime build not recorded'}), "
            f"target `{hw.get('target', '?')}`, priced as `{hw.get('profile', '?')}` at "
            f"${hw.get('price_per_hour', float('nan')):.4g}/h.")


def _metric_row(label: str, m: dict) -> str:
    return (f"| {label} | {_f(m['pr_auc'])} | {_f(m['roc_auc'])} | {_f(m['precision'])} | {_f(m['recall'])} | "
            f"{_f(m['f1'])} | {_f(m['ece'])} |")


def _f(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.4f}"


def _serving_line(evidence: dict) -> str:
    """What the serving-parity replay found: the features /predict computes against training's."""
    serving = evidence.get("serving")
    if not serving:
        return "- Serving parity was not measured for this version."
    return f"- Serving parity (test window replayed through the serving feature path): {serving['detail']}."

