"""Names of the Feast objects a spec defines, and the feature columns they serve.

Apart from `definitions` (which imports Feast), so the model server and the flows can name them
without loading Feast's offline machinery.
"""

from __future__ import annotations

from sluicegate.spec import DatasetSpec

ROW_ENTITY = "row"
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


def served_entities(spec: DatasetSpec) -> list[str]:
    """Entities with at least one aggregate: each gets a feature view in the service."""
    return [name for name in spec.entities if spec.aggregates_by_entity[name]]
