"""Names of the Feast objects a spec defines, and the feature columns they serve.

Apart from `store` (which imports Feast), so the model server and the flows can name them
without loading Feast's offline machinery.
"""

from __future__ import annotations

import numpy as np

from sluicegate.spec import Aggregate, DatasetSpec

ROW_ENTITY = "row"
# A time-since-previous feature is stored as the entity's last event time before the row (epoch
# seconds) and derived against the time it is asked for: the row's own in training, the request's at
# serving, so a request long after the entity's last event sees the real gap.
LAST_EVENT = "__last_event"
# The row view's timestamp when the table has none: one constant instant, so Feast's point-in-time
# join (feature ts <= event ts) matches each row's own values.
ROW_TS = "__row_ts"


def project(spec: DatasetSpec) -> str:
    """Feast project names take letters, digits and underscores."""
    return spec.name.replace("-", "_")


def feature_service(spec: DatasetSpec) -> str:
    """The feature service is named after the spec."""
    return project(spec)


def entity_view(entity: str) -> str:
    return f"{entity}_features"


def row_view() -> str:
    return "row_features"


def row_features(spec: DatasetSpec) -> list[str]:
    """The raw columns the model reads from the row itself: the row view's features."""
    keys = {e.key for e in spec.entities.values()}
    return [c for c in spec.request_columns if c not in keys and c != spec.timestamp]


def row_timestamp(spec: DatasetSpec) -> str:
    return spec.timestamp or ROW_TS


def stored_name(agg: Aggregate) -> str:
    """The column an aggregate has in its entity view."""
    return agg.feature_name + LAST_EVENT if agg.agg == "time_since_previous" else agg.feature_name


def entity_features(spec: DatasetSpec, entity: str) -> list[str]:
    """The feature columns one entity's view serves."""
    return [stored_name(a) for a in spec.aggregates_by_entity[entity]]


def derive_since_previous(columns, when_seconds: np.ndarray, spec: DatasetSpec) -> None:
    """Put each time-since-previous feature in `columns` (a dict or a DataFrame), from its stored last
    event time and the time each row is scored at (epoch seconds), and remove the stored column."""
    for agg in spec.features.aggregates:
        if agg.agg == "time_since_previous":
            last = np.asarray(columns.pop(stored_name(agg)), dtype=np.float64)
            columns[agg.feature_name] = when_seconds - last


def served_entities(spec: DatasetSpec) -> list[str]:
    """Entities with at least one aggregate: each gets a feature view in the service."""
    return [name for name in spec.entities if spec.aggregates_by_entity[name]]


def online_features(spec: DatasetSpec) -> list[str]:
    """What `/predict` looks up in the online store: every entity view's features (a request carries
    its row's own values, so the row view is offline only)."""
    return [f for entity in served_entities(spec) for f in entity_features(spec, entity)]


def online_refs(spec: DatasetSpec) -> list[str]:
    """The same, as Feast feature references."""
    return [f"{entity_view(e)}:{f}" for e in served_entities(spec) for f in entity_features(spec, e)]
