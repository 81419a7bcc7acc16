"""What a trained model is: its data, its training settings, its target, and the part of the spec that
shapes it (label, the columns it reads, the features and their encodings, the tensor layout).

Checkpoints, the pipeline's "unchanged" check, the registered version's tags and the model card all
carry the hash of that part, so a changed transform or feature list never resumes or reuses weights
trained for other inputs. Slices, behaviour checks, ranges and descriptions are left out: changing them
changes how a model is judged, not the model. Torch-free, so deploy and the CLI stay quick.
"""

from __future__ import annotations

import hashlib
import json

from sluicegate.features.inputs import numeric_inputs
from sluicegate.spec import DatasetSpec
from sluicegate.train.config import TrainConfig

HASH_CHARS = 16


def model_spec(spec: DatasetSpec) -> dict:
    """The model-relevant part of the spec, keyed by name so that a diff reads as what changed."""
    f = spec.features
    return {
        "table": {"label": spec.label, "positive": spec.table.positive, "timestamp": spec.timestamp,
                  "label_delay": spec.table.label_delay},
        "entities": {name: entity.key for name, entity in spec.entities.items()},
        "columns": {name: _column(spec, name) for name in _model_columns(spec)},
        "features": {
            "numeric": {n.column: n.transform for n in f.numeric_columns},
            "categorical": list(f.categorical),
            "time": list(f.time),
            "aggregates": {a.feature_name: a.model_dump(mode="json", exclude={"name"}) for a in f.aggregates},
            "ratios": {r.feature_name: r.model_dump(mode="json", exclude={"name"}) for r in f.ratios},
            "python": f.python.model_dump(mode="json") if f.python else None,
        },
        "inputs": {"numeric": numeric_inputs(spec), "categorical": spec.categorical_features},
    }


def _model_columns(spec: DatasetSpec) -> list[str]:
    aggregated = [a.column for a in spec.features.aggregates if a.column]
    return list(dict.fromkeys([*spec.request_columns, *aggregated, spec.label]))


def _column(spec: DatasetSpec, name: str) -> dict:
    column = spec.all_columns[name]
    # may_be_null decides the `__missing` indicator, the categories the codes: both shape the inputs
    return {"dtype": column.dtype, "may_be_null": column.may_be_null, "categories": column.category_list()}


def spec_hash(spec: DatasetSpec) -> str:
    """A short hash of `model_spec`: equal exactly when the model would read the same inputs."""
    return _digest(model_spec(spec))[:HASH_CHARS]


def fingerprint(data_hash: str, cfg: TrainConfig, spec: DatasetSpec, target: str = "cpu") -> str:
    """Identity of a training run's inputs: same data, config, model spec and target hardware."""
    return _digest({"data": data_hash, "config": cfg.model_dump(), "spec": spec_hash(spec), "target": target})


def _digest(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def spec_diff(old: dict, new: dict) -> list[str]:
    """What changed from one `model_spec` to another, one line per changed key."""
    before, after = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(before.keys() | after.keys()):
        if key not in before:
            lines.append(f"added {key} = {_show(after[key])}")
        elif key not in after:
            lines.append(f"removed {key} (was {_show(before[key])})")
        elif before[key] != after[key]:
            lines.append(f"{key}: {_show(before[key])} -> {_show(after[key])}")
    return lines


def _flatten(value, prefix: str = "") -> dict:
    if isinstance(value, dict) and value:
        out = {}
        for key, item in value.items():
            out |= _flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: value}


def _show(value) -> str:
    return json.dumps(value, default=str)
