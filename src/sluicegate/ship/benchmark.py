"""Inference benchmarks of an ONNX variant, after the MLPerf Inference rules.

MLPerf Inference (mlcommons.org, "MLPerf Inference Rules", v4.x, section
"Scenarios") defines the scenarios used here:
- SingleStream: one query of one sample at a time; the metric is the 90th
  percentile latency.
- Server: queries arrive by a Poisson process at a target rate; the run is
  valid only if the 99th percentile latency, measured from arrival, stays
  within the latency bound.
- Offline: all samples available at once; the metric is throughput.
Each scenario warms up first and must reach a minimum query count and
duration. MLPerf's minimums (e.g. 600 s, 24,576 queries) are for audited
submissions; ours are scaled to a pipeline stage and configurable.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import psutil

from sluicegate.runtime import INPUT_NAMES, OUTPUT_NAME, ModelInput, make_session


@dataclass(frozen=True)
class BenchConfig:
    warmup_queries: int = 100
    min_queries: int = 1024
    min_seconds: float = 0.5
    server_qps: float = 500.0  # target arrival rate of the Server scenario
    offline_batch: int = 1024
    batch_sizes: tuple[int, ...] = (1, 64, 1024)
    threads: int = 1  # intra-op threads; one core per model instance, as served
    seed: int = 0


@dataclass
class ScenarioResult:
    variant: str
    provider: str
    scenario: str  # SingleStream, Server, Offline or Batch<n>
    batch_size: int
    queries: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    samples_per_s: float
    target_qps: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VariantBenchmark:
    variant: str
    provider: str
    model_bytes: int
    memory_mb: float  # resident memory added by loading and running the session
    scenarios: list[ScenarioResult] = field(default_factory=list)

    def scenario(self, name: str) -> ScenarioResult:
        return next(s for s in self.scenarios if s.scenario == name)


def benchmark_variant(name: str, path, sample: ModelInput, cfg: BenchConfig, provider: str) -> VariantBenchmark:
    """All three MLPerf scenarios plus a batch-size sweep on one execution provider."""
    process = psutil.Process(os.getpid())
    rss_before = process.memory_info().rss
    session = make_session(path, threads=cfg.threads, providers=[provider])
    feeds = _single_feeds(sample)
    for i in range(cfg.warmup_queries):
        session.run([OUTPUT_NAME], feeds[i % len(feeds)])
    offline_result = offline(name, session, sample, cfg)
    results = [single_stream(name, session, feeds, cfg), server(name, session, feeds, cfg), offline_result]
    # Offline is the sweep's row at its batch size: measured once, reported under both names.
    results += [replace(offline_result, scenario=f"Batch{b}") if b == cfg.offline_batch
                else batch_sweep(name, session, sample, b, cfg) for b in cfg.batch_sizes]
    memory_mb = max(0.0, (process.memory_info().rss - rss_before) / 2**20)
    return VariantBenchmark(variant=name, provider=provider, model_bytes=os.path.getsize(path),
                            memory_mb=memory_mb, scenarios=results)


def single_stream(name: str, session, feeds: list[dict], cfg: BenchConfig) -> ScenarioResult:
    started = time.perf_counter()
    times, n = [], 0
    while n < cfg.min_queries or time.perf_counter() - started < cfg.min_seconds:
        times.append(_elapsed_ms(session, feeds[n % len(feeds)]))
        n += 1
    return _result(name, session, "SingleStream", 1, np.array(times), time.perf_counter() - started)


def server(name: str, session, feeds: list[dict], cfg: BenchConfig) -> ScenarioResult:
    """Open-loop Poisson arrivals served by one worker; latency counts queueing from arrival."""
    rng = np.random.default_rng(cfg.seed)
    n = max(cfg.min_queries, int(cfg.server_qps * cfg.min_seconds))
    arrivals = np.cumsum(rng.exponential(1.0 / cfg.server_qps, n))
    latencies = np.empty(n)
    origin = time.perf_counter()
    for i, arrival in enumerate(arrivals):
        wait = origin + arrival - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        session.run([OUTPUT_NAME], feeds[i % len(feeds)])
        latencies[i] = (time.perf_counter() - origin - arrival) * 1e3
    result = _result(name, session, "Server", 1, latencies, time.perf_counter() - origin)
    result.target_qps = cfg.server_qps
    return result


def offline(name: str, session, sample: ModelInput, cfg: BenchConfig) -> ScenarioResult:
    result = batch_sweep(name, session, sample, cfg.offline_batch, cfg)
    result.scenario = "Offline"
    return result


def batch_sweep(name: str, session, sample: ModelInput, batch: int, cfg: BenchConfig) -> ScenarioResult:
    big = _tile(sample, batch)
    feed = {INPUT_NAMES[0]: big.numeric, INPUT_NAMES[1]: big.categorical}
    session.run([OUTPUT_NAME], feed)
    times = []
    started = time.perf_counter()
    while len(times) < max(5, cfg.min_queries // max(1, batch)) or time.perf_counter() - started < cfg.min_seconds:
        times.append(_elapsed_ms(session, feed))
    elapsed = time.perf_counter() - started
    result = _result(name, session, f"Batch{batch}", batch, np.array(times), elapsed)
    result.samples_per_s = len(times) * batch / elapsed
    return result


def cost_per_million(samples_per_s: float, price_per_hour: float) -> float:
    """Dollars per one million predictions at a sustained throughput."""
    return price_per_hour / (samples_per_s * 3600.0) * 1e6 if samples_per_s > 0 else float("inf")


def _result(name, session, scenario, batch, times_ms: np.ndarray, seconds: float) -> ScenarioResult:
    return ScenarioResult(variant=name, provider=session.get_providers()[0], scenario=scenario,
                          batch_size=batch, queries=len(times_ms), seconds=seconds,
                          p50_ms=float(np.percentile(times_ms, 50)), p90_ms=float(np.percentile(times_ms, 90)),
                          p99_ms=float(np.percentile(times_ms, 99)),
                          samples_per_s=len(times_ms) * batch / seconds if seconds > 0 else 0.0)


def _single_feeds(sample: ModelInput) -> list[dict]:
    return [{INPUT_NAMES[0]: sample.numeric[i:i + 1], INPUT_NAMES[1]: sample.categorical[i:i + 1]}
            for i in range(min(len(sample), 256))]


def _elapsed_ms(session, feed: dict) -> float:
    t0 = time.perf_counter()
    session.run([OUTPUT_NAME], feed)
    return (time.perf_counter() - t0) * 1e3


def _tile(sample: ModelInput, rows: int) -> ModelInput:
    return sample.take(np.arange(rows) % len(sample))
