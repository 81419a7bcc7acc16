"""Where batch work runs: in process unless a Dask scheduler is configured."""

from __future__ import annotations

import pytest

from sluicegate import compute
from sluicegate.config import Settings


def test_in_process_keeps_the_order_and_runs_every_item(tmp_path):
    settings = Settings(home=tmp_path)
    assert settings.dask_scheduler is None
    assert compute.map_items(settings, lambda x: x * x, [3, 1, 2]) == [9, 1, 4]


def test_an_unreachable_scheduler_is_an_error_not_a_silent_fallback(tmp_path):
    import dask

    settings = Settings(home=tmp_path, dask_scheduler="tcp://127.0.0.1:9")
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), pytest.raises(OSError):
        compute.map_items(settings, abs, [-1, -2])
