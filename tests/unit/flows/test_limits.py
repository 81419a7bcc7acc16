"""One training and one promotion per model at a time: the names, and the embedded mode's file lock
(the Prefect server's global concurrency limits: tests/integration/test_orchestration.py)."""

from __future__ import annotations

import threading
import time

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from sluicegate.flows import limits


def test_limit_names_are_per_kind_and_model_and_valid_prefect_names():
    assert limits.limit_name(limits.TRAIN, "fraud-detector") == "train-fraud-detector"
    assert limits.limit_name(limits.PROMOTE, "fraud-detector") == "promote-fraud-detector"
    assert limits.limit_name(limits.TRAIN, "team/model%1") == "train-team_model_1"


def test_the_feature_stage_takes_its_tables_slot(home):
    """Two runs on one table write the same feature files and online state: one at a time per table,
    whatever model each trains."""
    from sluicegate.config import Settings

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with limits.one_at_a_time(limits.FEATURES, Settings()) as name:
            assert name == f"features-{Settings().paths.table}"
        assert (Settings().paths.locks / f"{name}.lock").exists()


def test_server_mode_follows_prefect_api_url():
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        assert limits.server_mode()
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert not limits.server_mode()


@pytest.mark.timeout(60)
def test_embedded_mode_serializes_on_a_file_lock_under_the_home(home):
    from sluicegate.config import Settings

    settings = Settings()
    spans: list[tuple[float, float]] = []

    def hold():
        with limits.one_at_a_time(limits.TRAIN, settings) as name:
            start = time.monotonic()
            time.sleep(0.3)
            spans.append((start, time.monotonic()))
        assert name == "train-fraud-detector"

    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        threads = [threading.Thread(target=hold) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    spans.sort()
    assert len(spans) == 3 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
    assert (settings.paths.locks / "train-fraud-detector.lock").exists()
    assert not (settings.paths.locks / "promotion.lock").exists()  # not the registry's own lock
