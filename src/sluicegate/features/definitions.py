"""The Feast objects a spec defines, and the store configured from settings."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import feast
import pandas as pd
from feast import Entity, FeatureService, FeatureView, Field, FileSource, Project, RepoConfig, ValueType
from feast.infra.offline_stores.dask import DaskOfflineStoreConfig
from feast.infra.online_stores.redis import RedisOnlineStoreConfig
from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig
from feast.repo_config import RegistryConfig
from feast.types import Bool, Float64, Int64, String

from sluicegate.config import Settings
from sluicegate.features import catalog
from sluicegate.features.offline_store import AsofFileOfflineStoreConfig
from sluicegate.features.tables import feature_table_paths
from sluicegate.spec import DatasetSpec

# Longer than the longest window the spec declares, so the PIT join never drops a row we wrote.
MIN_TTL = timedelta(days=31)
FEAST_TYPES = {"int64": (ValueType.INT64, Int64), "string": (ValueType.STRING, String)}
FIELD_TYPES = {"int64": Int64, "string": String, "float64": Float64, "bool": Bool}


class FeastDefinitions(NamedTuple):
    project: Project
    entities: list[Entity]
    sources: list[FileSource]
    views: list[FeatureView]
    service: FeatureService

    def objects(self) -> list:
        return [self.project, *self.entities, *self.sources, *self.views, self.service]


def build_definitions(spec: DatasetSpec, features_dir: Path) -> FeastDefinitions:
    """The Feast objects of a spec: a row entity keyed by the row id with an offline view of the row's
    own columns; an entity per declared entity (its key's type) with a view of its aggregates; a
    feature service named after the spec. apply_definitions and feature_repo/definitions.py use these."""
    paths = feature_table_paths(features_dir, spec)
    longest = max([pd.Timedelta(a.window or 0) for a in spec.features.aggregates] + [pd.Timedelta(0)])
    ttl = max(MIN_TTL, (longest + pd.Timedelta(days=1)).to_pytimedelta())
    row_key = spec.id
    row = _view(catalog.ROW_ENTITY, row_key, spec.all_columns[row_key].dtype, catalog.row_view(),
                paths[catalog.row_view()], catalog.row_timestamp(spec),
                [Field(name=c, dtype=FIELD_TYPES[spec.columns[c].dtype]) for c in catalog.row_features(spec)],
                ttl, online=False)  # a request carries its own row: nothing to look up online
    parts = [row]
    for name in catalog.served_entities(spec):
        key = spec.entities[name].key
        features = [Field(name=a.feature_name, dtype=Int64 if a.agg == "count" else Float64)
                    for a in spec.aggregates_by_entity[name]]
        view_name = catalog.entity_view(name)
        parts.append(_view(name, key, spec.columns[key].dtype, view_name, paths[view_name], spec.timestamp,
                           features, ttl, online=False))  # serving reads features.online
    entities, sources, views = (list(p) for p in zip(*parts, strict=True))
    service = FeatureService(name=catalog.feature_service(spec), features=views)
    return FeastDefinitions(Project(name=catalog.project(spec)), entities, sources, views, service)


def _view(entity_name: str, key: str, key_dtype: str, view_name: str, path: Path, timestamp: str,
          features: list[Field], ttl: timedelta, online: bool) -> tuple[Entity, FileSource, FeatureView]:
    value_type, field_type = FEAST_TYPES[key_dtype]
    entity = Entity(name=entity_name, join_keys=[key], value_type=value_type)
    source = FileSource(name=f"{view_name}_source", path=str(path), timestamp_field=timestamp)
    view = FeatureView(name=view_name, entities=[entity], ttl=ttl, online=online,
                       schema=[Field(name=key, dtype=field_type), *features], source=source)
    return entity, source, view


def feature_store(settings: Settings, spec: DatasetSpec) -> feast.FeatureStore:
    """A FeatureStore configured in code from settings, independent of the working directory."""
    return feast.FeatureStore(config=repo_config(settings, spec))


def repo_config(settings: Settings, spec: DatasetSpec, fast_retrieval: bool = True) -> RepoConfig:
    """Registry and online store under SLUICEGATE_HOME (or Redis); file offline store.

    fast_retrieval=False uses Feast's stock dask store: same answers, O(rows per key squared).
    """
    paths = settings.paths
    paths.feast.mkdir(parents=True, exist_ok=True)
    if settings.feast_redis:
        online = RedisOnlineStoreConfig(connection_string=settings.feast_redis)
    else:
        online = SqliteOnlineStoreConfig(path=str(paths.feast / "online.db"))
    return RepoConfig(
        project=catalog.project(spec),
        provider="local",
        registry=RegistryConfig(registry_type="file", path=str(paths.feast / "registry.db")),
        online_store=online,
        offline_store=(AsofFileOfflineStoreConfig(memory_limit=settings.feature_join_memory,
                                                  temp_directory=str(paths.feast / "spill"))
                       if fast_retrieval else DaskOfflineStoreConfig()),
        # 3 is the current scheme; lower versions raise deprecation warnings.
        entity_key_serialization_version=3,
        # The entity frames training_frame hands Feast are in UTC already: Feast's coercion copies the frame
        # and re-parses every timestamp column (3 s at 10M rows).
        coerce_tz_aware=False,
        repo_path=paths.feast,
    )


def apply_definitions(store: feast.FeatureStore, spec: DatasetSpec, settings: Settings) -> None:
    """Register entities, sources, views and the service; re-applying changes nothing."""
    store.apply(build_definitions(spec, settings.paths.features).objects())
