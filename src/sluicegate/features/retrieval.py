"""The point-in-time training set: the rows with their features through Feast's feature service."""

from __future__ import annotations

import feast
import pandas as pd
import pytz

from sluicegate import compute
from sluicegate.config import Settings
from sluicegate.features import catalog, definitions
from sluicegate.features.aggregates import ROW_INSTANT, as_utc
from sluicegate.features.offline_store import FEAST_EVENT_TS, AsofFileOfflineStoreConfig
from sluicegate.spec import DatasetSpec


def training_frame(store: feast.FeatureStore, rows: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """The rows, in order, with the model's columns from Feast's feature service: the row view's (the
    row's own values) and every entity view's as of each row's timestamp. Other columns (label, slices)
    are the rows' own.

    The fast store answers every entity row in order, so each view is fetched with the rows' own
    (key, timestamp) pairs. Feast's stock dask store keeps one row per (join keys seen so far,
    timestamp), so two events of one entity in the same second would lose a row: it is asked for the
    distinct pairs, joined back to the rows.
    """
    row_columns = catalog.row_features(spec)
    # The frame's columns, gathered as they are (the rows' own arrays shared, not copied) and framed once.
    columns = {name: rows[name].array for name in rows.columns if name not in row_columns}
    # Feast re-parses any timestamp whose tz is not pytz's UTC object, row by row.
    when = (as_utc(rows[spec.timestamp]) if spec.timestamp
            else pd.Series(ROW_INSTANT, index=rows.index).dt.as_unit("ns")).dt.tz_convert(pytz.UTC)
    service = store.get_feature_service(catalog.feature_service(spec))
    in_order = isinstance(store.config.offline_store, AsofFileOfflineStoreConfig)
    # The row view last: its columns (the row's strings) are the most to hold through the other joins.
    projections = sorted(service.feature_view_projections, key=lambda p: p.name == catalog.row_view())
    for projection in projections:
        view = store.get_feature_view(projection.name)
        key = view.entity_columns[0].name
        refs = [f"{projection.name_to_use()}:{f.name}" for f in projection.features]
        lookup = pd.DataFrame({key: rows[key].array, FEAST_EVENT_TS: when.array})
        entity_df = lookup if in_order else lookup.drop_duplicates(ignore_index=True)
        found = store.get_historical_features(entity_df=entity_df, features=refs).to_df()
        joined = found if in_order else lookup.merge(found, on=[key, FEAST_EVENT_TS], how="left")
        for feature in projection.features:  # by position; .array keeps pyarrow strings compact (no objects)
            columns[feature.name] = joined[feature.name].array
        del found, joined, entity_df
        compute.release_free_memory()  # each view's join starts from what is held, not the last one's peak
    # The rows' column order, then the aggregates in the spec's order. copy=False keeps each column's array:
    # selecting the columns from a frame copied all of them (1 GB at 10M rows).
    order = [*rows.columns, *(a.feature_name for a in spec.features.aggregates)]
    return pd.DataFrame({name: columns[name] for name in order}, copy=False)


def offline_features(settings: Settings, spec: DatasetSpec, rows: pd.DataFrame) -> pd.DataFrame:
    """`training_frame` through the table's own Feast store: the features training reads for `rows`."""
    return training_frame(definitions.feature_store(settings, spec), rows, spec)
