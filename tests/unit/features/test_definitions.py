"""The Feast objects a spec defines, registered idempotently."""

from __future__ import annotations

from sluicegate.features import catalog, definitions


def test_apply_is_idempotent_and_every_view_is_offline_only(built, spec):
    settings, store, _ = built

    def registered():
        return (sorted(e.name for e in store.list_entities()),
                sorted((v.name, tuple(f.name for f in v.features)) for v in store.list_feature_views()),
                [s.name for s in store.list_feature_services()])

    before = registered()
    definitions.apply_definitions(store, spec, settings)
    definitions.apply_definitions(store, spec, settings)
    assert registered() == before
    assert before[2] == [catalog.feature_service(spec)] == [spec.name]
    assert before[0] == ["customer", "merchant", "row"]
    # Serving reads features.online: no view is materialized into Feast's online store.
    views = store.list_feature_views()
    assert sorted(v.name for v in views) == ["customer_features", "merchant_features", "row_features"]
    assert not any(v.online for v in views)
