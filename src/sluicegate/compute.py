"""Where batch work runs: in this process (the default) or on a Dask cluster.

`SLUICEGATE_DASK_SCHEDULER` (Settings.dask_scheduler) names a running `distributed` scheduler
(`tcp://host:8786`, the Dask Kubernetes operator's service, a LocalCluster's address); unset, the
same functions run here, one after another. Work is handed over as independent items (shards of
rows) and comes back in order, so the result does not depend on where it ran.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from sluicegate.config import Settings

T = TypeVar("T")
R = TypeVar("R")


def map_items(settings: Settings, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """fn over every item, in order: on the cluster when one is configured and there is more than one."""
    if not settings.dask_scheduler or len(items) < 2:
        return [fn(item) for item in items]
    from distributed import Client

    with Client(settings.dask_scheduler, set_as_default=False) as client:
        # pure=False: equal items are still separate tasks (two shards may compare equal).
        return client.gather(client.map(fn, items, pure=False))
