"""One feature build per table, one training and one promotion per model at a time, whichever
machine starts them.

- Against a Prefect server (`PREFECT_API_URL` set: `make up`, a worker, CI): Prefect global
  concurrency limits `features-<table>` (two runs on one table would write its feature files and
  online state at once), `train-<model>` and `promote-<model>`, one slot each, created on first use
  (`prefect gcl ls` lists them; an operator may change them with `prefect gcl update`). Every
  process that talks to that server waits for the slot, on any machine.
- Embedded (no `PREFECT_API_URL`: Prefect's temporary server lives and dies with this process, so
  its limits bind no other process): a file lock under `SLUICEGATE_HOME/locks`, which binds every
  process on this machine.

The champion move itself stays a compare-and-set in `ship.registry` (under its own file lock), so a
decision taken against a champion that moved meanwhile still loses the race.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

from sluicegate.config import Settings, file_lock

FEATURES, TRAIN, PROMOTE = "features", "train", "promote"
SLOTS = 1
_BANNED = re.compile(r"[/%&><]")  # characters Prefect refuses in a name


def limit_name(kind: str, model_name: str) -> str:
    return _BANNED.sub("_", f"{kind}-{model_name}")


def server_mode() -> bool:
    """True when a Prefect server is configured; False on Prefect's per-process temporary server."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def ensure_limit(name: str, slots: int = SLOTS) -> bool:
    """Create the global concurrency limit when it is missing (idempotent; two creators racing is
    fine). Returns True when this call created it. An existing limit is left as an operator set it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
        except ObjectAlreadyExists:  # another process created it between the read and the create
            return False
    return True


@contextmanager
def one_at_a_time(kind: str, settings: Settings) -> Iterator[str]:
    """Hold the `<kind>-<model>` slot (`features-<table>` for FEATURES) or, embedded, its file lock,
    for the body; yields its name. `concurrency(strict=True)`: with Prefect 3.8's default
    (strict=False) a missing limit is skipped with a warning, and nothing would be serialized."""
    name = limit_name(kind, settings.paths.table if kind == FEATURES else settings.model_name)
    log = _logger()
    if not server_mode():
        log.info(f"{name}: waiting for the file lock (no Prefect server configured: this machine only)")
        with file_lock(settings.paths.locks / f"{name}.lock"):
            log.info(f"{name}: holding the file lock")
            yield name
        return
    from prefect.concurrency.sync import concurrency

    if ensure_limit(name):
        log.info(f"{name}: created the global concurrency limit ({SLOTS} slot)")
    log.info(f"{name}: waiting for the global concurrency slot")
    # A lease renewal that fails (the server briefly unreachable) is logged, not fatal: a training
    # hours long is not thrown away for it; the registry's compare-and-set still guards the champion.
    with concurrency(name, occupy=1, strict=True, raise_on_lease_renewal_failure=False):
        log.info(f"{name}: holding the global concurrency slot")
        yield name


def _logger():
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("sluicegate.flows")
