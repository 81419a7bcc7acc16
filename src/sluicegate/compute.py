"""Where batch work runs: in this process (the default) or on a Dask cluster.

`SLUICEGATE_DASK_SCHEDULER` (Settings.dask_scheduler) names a running `distributed` scheduler
(`tcp://host:8786`, the Dask Kubernetes operator's service, a LocalCluster's address); unset, the
same functions run here, one after another. Work is handed over as independent items (shards of
rows) and comes back in order, so the result does not depend on where it ran.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
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


def peak_rss_gb() -> float | None:
    """This process's peak RSS since the last call, in GB, or None off Linux.

    The kernel's high-water mark (VmHWM) is read, then reset through /proc/self/clear_refs, so each
    step gets its own peak; psutil reads the mark but cannot reset it."""
    try:
        status = Path("/proc/self/status").read_text()
        kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, StopIteration, ValueError):
        return None
    return kib / 1024 / 1024


def release_free_memory() -> None:
    """Hand memory that is free but still mapped back to the system, between steps of a large table.

    pandas' temporaries leave glibc's heap fragmented, and Arrow's allocator keeps what it freed for
    reuse: without this, a stage starts from the previous stage's high-water mark, not from what it
    still holds. Dask's workers trim the same way (malloc_trim)."""
    import pyarrow

    pyarrow.default_memory_pool().release_unused()
    if (trim := _malloc_trim()) is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library is another (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
