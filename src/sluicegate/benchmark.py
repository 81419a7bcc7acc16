"""Latency and throughput of an ONNX variant on the local execution provider."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime as ort

from sluicegate.export import INPUT_NAMES, OUTPUT_NAME
from sluicegate.inputs import ModelInput


@dataclass
class LatencyResult:
    provider: str
    p50_ms_batch1: float
    p99_ms_batch1: float
    throughput_batch: int
    rows_per_s: float

    def to_dict(self) -> dict:
        return asdict(self)


def measure(session: ort.InferenceSession, sample: ModelInput, single_queries: int = 2000,
            throughput_batch: int = 1024, min_seconds: float = 0.5, warmup: int = 50) -> LatencyResult:
    """p50/p99 of single-row calls and rows/s at a large batch, after warm-up."""
    feeds = [{INPUT_NAMES[0]: sample.numeric[i:i + 1], INPUT_NAMES[1]: sample.categorical[i:i + 1]}
             for i in range(min(len(sample), 256))]
    for i in range(warmup):
        session.run([OUTPUT_NAME], feeds[i % len(feeds)])
    times = np.empty(single_queries)
    for i in range(single_queries):
        t0 = time.perf_counter()
        session.run([OUTPUT_NAME], feeds[i % len(feeds)])
        times[i] = time.perf_counter() - t0
    big = _tile(sample, throughput_batch)
    big_feed = {INPUT_NAMES[0]: big.numeric, INPUT_NAMES[1]: big.categorical}
    session.run([OUTPUT_NAME], big_feed)
    calls, started = 0, time.perf_counter()
    while calls < 5 or time.perf_counter() - started < min_seconds:
        session.run([OUTPUT_NAME], big_feed)
        calls += 1
    elapsed = time.perf_counter() - started
    return LatencyResult(
        provider=session.get_providers()[0],
        p50_ms_batch1=float(np.percentile(times, 50) * 1e3),
        p99_ms_batch1=float(np.percentile(times, 99) * 1e3),
        throughput_batch=throughput_batch,
        rows_per_s=calls * throughput_batch / elapsed,
    )


def _tile(sample: ModelInput, rows: int) -> ModelInput:
    idx = np.arange(rows) % len(sample)
    return sample.take(idx)
