"""Dynamic micro-batching: concurrent requests share one model call.

Requests queue up on the event loop; a single worker takes up to
`max_rows` rows at a time and makes one model call for all of them. The call
runs either on the event loop (`in_thread=False`: a small model answers a
batch in tens of microseconds, less than a thread hop costs, and a second
thread waiting for the GIL behind the busy loop adds milliseconds) or in one
dedicated thread (`in_thread=True`: for large models or GPUs, where the call
is long and onnxruntime releases the GIL while it runs).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class _Job:
    payload: Any
    rows: int
    future: asyncio.Future


class MicroBatcher:
    """`process(payloads)` runs in the worker thread and returns one result per payload."""

    def __init__(self, process: Callable[[list[Any]], Sequence[Any]], max_rows: int, max_wait_s: float,
                 name: str, on_batch: Callable[[int], None] | None = None, in_thread: bool = False):
        self._process = process
        self.max_rows = max_rows
        self.max_wait_s = max_wait_s
        self._name = name
        self._on_batch = on_batch
        self._in_thread = in_thread
        self._jobs: deque[_Job] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        if self._in_thread:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def submit(self, payload: Any, rows: int) -> Any:
        if self._closing or self._wakeup is None:
            raise RuntimeError("the server is shutting down")
        future = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(payload, rows, future))
        self._wakeup.set()
        return await future

    async def stop(self) -> None:
        """Finish every queued job, then stop the worker."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._worker is not None:
            await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def _take(self) -> tuple[list[_Job], int]:
        """The next batch: queued jobs up to `max_rows` rows (at least one job), and its row count."""
        jobs = [self._jobs.popleft()]
        rows = jobs[0].rows
        while self._jobs and rows + self._jobs[0].rows <= self.max_rows:
            job = self._jobs.popleft()
            jobs.append(job)
            rows += job.rows
        return jobs, rows

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._jobs:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_wait_s and sum(j.rows for j in self._jobs) < self.max_rows:
                await asyncio.sleep(self.max_wait_s)
            else:
                # One more turn of the event loop before taking the batch: requests whose bytes have
                # already arrived are parsed and queued, and share this call. Measured at 16
                # connections: +14% req/s and a lower p99; when idle it costs one loop turn.
                await asyncio.sleep(0)
            jobs, rows = self._take()
            if self._on_batch:
                self._on_batch(rows)
            payloads = [j.payload for j in jobs]
            try:
                if self._executor is None:
                    results = self._process(payloads)
                else:
                    results = await loop.run_in_executor(self._executor, self._process, payloads)
            except Exception as exc:  # the batch fails as a whole; each caller sees why
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, result in zip(jobs, results, strict=True):
                if job.future.done():  # a caller that went away cancelled its future
                    continue
                if isinstance(result, Exception):  # this request alone was refused
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
