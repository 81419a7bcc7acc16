"""Prediction log for monitoring: every predicted row with its features, output, model version and latency.

Requests append a record to a bounded in-memory queue (a deque append: never
waits, never does I/O); one thread turns queued records into columns and
writes a parquet file per flush under `SLUICEGATE_HOME/predictions/<endpoint>/`.
Columnar writes keep the writer's Python work (and so its hold on the GIL)
small; per-row inserts from a thread were measured to stall the event loop.
A full queue drops records and counts them rather than slow a request down.
A failed write (disk full, folder gone) keeps its records for the next flush, up to
`max_queue` of them, and shows in `error` until a write succeeds again.
`close()` writes everything queued, so a graceful shutdown loses nothing.

Read it back with `pandas.read_parquet(SLUICEGATE_HOME/predictions/v2)`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("sluicegate.serving")

POLL_SECONDS = 0.25


@dataclass(slots=True)
class Record:
    """One request. `features` maps a name to one value per row (a list, a 1-D array,
    or a 2-D array whose columns the log names through `PredictionLog(expand=...)`)."""

    endpoint: str
    ts: float
    request_id: str | None
    model_name: str
    model_version: str
    latency_ms: float
    probabilities: np.ndarray
    features: dict
    threshold: float | None = None


class PredictionLog:
    def __init__(self, folder: Path, max_queue: int, flush_seconds: float = 5.0, flush_rows: int = 100_000,
                 expand: dict[str, list[str]] | None = None, on_drop: Callable[[], None] | None = None,
                 on_error: Callable[[], None] | None = None):
        self.folder = folder
        self.max_queue = max_queue
        self.flush_seconds = flush_seconds
        self.flush_rows = flush_rows
        self.expand = expand or {}
        self.dropped = 0
        self.error: str | None = None  # the last write's error while writes fail; None once one succeeds
        self._on_drop = on_drop
        self._on_error = on_error
        self._queue: deque[Record] = deque()
        self._stop = threading.Event()
        self._seq = 0
        folder.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._write_loop, name="prediction-log", daemon=True)
        self._thread.start()

    def put(self, record: Record) -> None:
        """Never blocks: a full queue drops the record and counts it."""
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            if self._on_drop:
                self._on_drop()
            return
        self._queue.append(record)  # deque.append is atomic: no lock on the hot path

    def depth(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        """Write everything queued so far, then stop the writer."""
        self._stop.set()
        self._thread.join()

    def _write_loop(self) -> None:
        pending: list[Record] = []
        rows, last = 0, time.monotonic()
        while True:
            stopping = self._stop.wait(POLL_SECONDS)
            while self._queue:
                record = self._queue.popleft()
                pending.append(record)
                rows += len(record.probabilities)
            due = rows >= self.flush_rows or time.monotonic() - last >= self.flush_seconds
            if pending and (due or stopping):
                # What could not be written waits for the next flush (flush_seconds later, not at once).
                pending = self._keep_at_most(self._flush(pending), self.max_queue)
                rows, last = 0, time.monotonic()
            if stopping and not self._queue:
                if pending:
                    log.error("prediction log: %d records not written at shutdown: %s", len(pending), self.error)
                return

    def _keep_at_most(self, records: list[Record], limit: int) -> list[Record]:
        """Bound what waits for a failing disk: the oldest records beyond `limit` are dropped and counted."""
        excess = len(records) - limit
        if excess <= 0:
            return records
        self.dropped += excess
        if self._on_drop:
            for _ in range(excess):
                self._on_drop()
        return records[excess:]

    def _flush(self, records: list[Record]) -> list[Record]:
        """Write the records; returns those that could not be written."""
        by_endpoint: dict[str, list[Record]] = {}
        for record in records:
            by_endpoint.setdefault(record.endpoint, []).append(record)
        failed: list[Record] = []
        for endpoint, group in by_endpoint.items():
            tmp = None
            try:
                table = self._table(group)
                folder = self.folder / endpoint
                folder.mkdir(parents=True, exist_ok=True)
                self._seq += 1
                final = folder / f"part-{time.time_ns()}-{self._seq:06d}.parquet"
                tmp = final.with_name(f".{final.name}.tmp")
                pq.write_table(table, tmp)
                tmp.rename(final)  # readers globbing *.parquet never see a half-written file
                self.error = None
            except Exception as exc:  # the log must never take the server down
                if tmp is not None:
                    with contextlib.suppress(OSError):  # a half-written file is never read (dot name)
                        tmp.unlink(missing_ok=True)
                self.error = f"{type(exc).__name__}: {exc}"
                if self._on_error:
                    self._on_error()
                if isinstance(exc, OSError):  # disk full, folder gone: worth another try
                    log.error("prediction log: cannot write %d %s records, kept for the next flush: %s",
                              len(group), endpoint, exc)
                    failed.extend(group)
                else:  # these records cannot become a table: retrying would not help
                    log.error("prediction log: lost %d %s records: %s", len(group), endpoint, exc)
        return failed

    def _table(self, records: list[Record]) -> pa.Table:
        counts = np.array([len(r.probabilities) for r in records])
        probs = np.concatenate([r.probabilities for r in records]).astype(np.float64)
        thresholds = np.repeat([np.nan if r.threshold is None else r.threshold for r in records], counts)
        columns = {
            "ts": pa.array((np.repeat([r.ts for r in records], counts) * 1e6).astype(np.int64),
                           pa.timestamp("us", tz="UTC")),
            "request_id": pa.array(np.repeat(np.array([r.request_id for r in records], dtype=object), counts),
                               pa.string()),
            "model_name": pa.array(np.repeat(np.array([r.model_name for r in records], dtype=object), counts),
                               pa.string()),
            "model_version": pa.array(np.repeat(np.array([r.model_version for r in records], dtype=object), counts),
                               pa.string()),
            "latency_ms": np.repeat([r.latency_ms for r in records], counts),
            "row": np.concatenate([np.arange(n) for n in counts]),
            "probability": probs,
            "decision": pa.array(np.where(np.isnan(thresholds), False, probs >= thresholds),
                                 mask=np.isnan(thresholds)),
        }
        for name in records[0].features:
            values = [r.features[name] for r in records]
            if isinstance(values[0], np.ndarray) and values[0].ndim == 2:
                block = np.concatenate(values)
                for j, column in enumerate(self.expand.get(name) or [f"{name}_{j}" for j in range(block.shape[1])]):
                    columns[column] = block[:, j]
            elif isinstance(values[0], np.ndarray):
                columns[name] = np.concatenate(values)
            else:
                columns[name] = [v for chunk in values for v in chunk]
        table = pa.table(columns)
        # A column with no value in this file (all None) is typed string, so files read back together.
        for i, column in enumerate(table.schema):
            if pa.types.is_null(column.type):
                table = table.set_column(i, column.name, table.column(i).cast(pa.string()))
        return table
