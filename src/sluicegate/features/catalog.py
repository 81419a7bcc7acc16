"""Names of the Feast objects a spec defines, and the feature columns they serve.

Apart from `store` (which imports Feast), so the model server and the flows can name them
without loading Feast's offline machinery.
"""

from __future__ import annotations

from sluicegate.spec import DatasetSpec

ROW_ENTITY = "row"


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


def entity_features(spec: DatasetSpec, entity: str) -> list[str]:
    """The feature columns one entity's view serves."""
    return [a.feature_name for a in spec.aggregates_by_entity[entity]]


def served_entities(spec: DatasetSpec) -> list[str]:
    """Entities with at least one aggregate: each gets a feature view in the service."""
    return [name for name in spec.entities if spec.aggregates_by_entity[name]]


def online_features(spec: DatasetSpec) -> list[str]:
    """What `/predict` looks up in the online store: every entity view's features."""
    return [f for entity in served_entities(spec) for f in entity_features(spec, entity)]
