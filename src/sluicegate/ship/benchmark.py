"""Inference benchmarks of an ONNX variant, driven by MLPerf's own LoadGen.

MLPerf Inference (mlcommons.org, "MLPerf Inference Rules", section "Scenarios")
defines the scenarios; `mlcommons-loadgen` (import `mlperf_loadgen`) schedules them
in C++, measures every query from its scheduled time and says whether the run is valid:
- SingleStream: one query of one sample at a time, the next issued when the last
  completes; the metric is the 90th percentile latency, with LoadGen's conservative
  early-stopping estimates of the 90th and 99th.
- Server: queries arrive by a Poisson process at a target rate and are served by one
  worker (one model instance, as served); the run is valid only if the 99th percentile
  latency, measured from arrival, stays within the latency bound (early stopping checks
  enough queries were seen to say so).
- Offline: every sample issued at once; the metric is throughput.
Each scenario warms up first and must reach a minimum query count and duration.
MLPerf's minimums (e.g. 600 s, 24,576 queries) are for audited submissions; ours are
scaled to a pipeline stage and configurable. A batch-size sweep (Batch<n>, not an
MLPerf scenario) times the session directly at a few batch sizes.
"""

from __future__ import annotations

import json
import os
import queue
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlperf_loadgen as lg
import numpy as np
import psutil

from sluicegate.hardware import device_description
from sluicegate.runtime import INPUT_NAMES, OUTPUT_NAME, ModelInput, Provider, make_session, onnxruntime_build


@dataclass(frozen=True)
class BenchConfig:
    warmup_queries: int = 100
    # LoadGen's min_query_count (Offline: min samples). Early stopping at the 99th percentile needs
    # about 460 queries even when none exceeds the bound: fewer and Server is INVALID.
    min_queries: int = 1024
    min_seconds: float = 0.5  # LoadGen's min_duration
    server_qps: float = 500.0  # target arrival rate of the Server scenario
    server_latency_ms: float = 10.0  # the Server scenario's latency bound at its 99th percentile
    offline_batch: int = 1024  # rows per session call when Offline's samples are processed
    batch_sizes: tuple[int, ...] = (1, 64, 1024)
    threads: int = 1  # intra-op threads; one core per model instance, as served
    seed: int = 0  # LoadGen's schedule, sample-index and QSL seeds
    max_seconds: float = 60.0  # LoadGen's max_duration: a run that cannot finish is cut (and INVALID)


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
    # LoadGen's verdict (MLPerf scenarios only; None for the batch sweep).
    validity: str | None = None  # "VALID" or "INVALID"
    invalid_reason: str | None = None
    early_stopping_met: bool | None = None
    early_stopping_p90_ms: float | None = None  # SingleStream: conservative estimates from early stopping
    early_stopping_p99_ms: float | None = None

    @property
    def valid(self) -> bool | None:
        return None if self.validity is None else self.validity == "VALID"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VariantBenchmark:
    variant: str
    provider: str  # the provider the session ran on (its get_providers()), not the one asked for
    model_bytes: int
    memory_mb: float  # resident memory added by loading and running the session
    scenarios: list[ScenarioResult] = field(default_factory=list)
    device: str = ""  # what the provider ran on (hardware.device_description)
    onnxruntime: str = ""  # the onnxruntime build (runtime.onnxruntime_build)

    def scenario(self, name: str) -> ScenarioResult:
        return next(s for s in self.scenarios if s.scenario == name)


def benchmark_variant(name: str, path, sample: ModelInput, cfg: BenchConfig, provider: Provider | list[Provider],
                      device: str | None = None) -> VariantBenchmark:
    """The three MLPerf scenarios under LoadGen plus a batch-size sweep on one execution provider.

    The session runs on the first provider given or not at all (`make_session`); the result names the
    provider the session reports, the device it ran on and the onnxruntime build."""
    process = psutil.Process(os.getpid())
    rss_before = process.memory_info().rss
    providers = provider if isinstance(provider, list) else [provider]
    session = make_session(path, threads=cfg.threads, providers=providers)
    ran_on = session.get_providers()[0]
    sut = _Sut(session, sample)
    warm_ns = [_elapsed_ms(session, sut.feeds[i % len(sut.feeds)]) * 1e6 for i in range(max(1, cfg.warmup_queries))]
    results = [run_scenario(name, sut, "SingleStream", cfg, expected_ns=float(np.median(warm_ns))),
               run_scenario(name, sut, "Server", cfg),
               run_scenario(name, sut, "Offline", cfg, expected_qps=sut.offline_rate(cfg.offline_batch))]
    results += [batch_sweep(name, session, sample, b, cfg) for b in cfg.batch_sizes]
    memory_mb = max(0.0, (process.memory_info().rss - rss_before) / 2**20)
    return VariantBenchmark(variant=name, provider=ran_on, model_bytes=os.path.getsize(path),
                            memory_mb=memory_mb, scenarios=results,
                            device=device if device is not None else device_description(ran_on),
                            onnxruntime=onnxruntime_build())


class _Sut:
    """The system under test LoadGen drives: the session over a fixed set of samples (LoadGen's
    QSL indexes them), one worker thread for Server and Offline (issue callbacks must not block)."""

    def __init__(self, session, sample: ModelInput):
        self.session = session
        self.count = min(len(sample), 256)
        self.numeric, self.categorical = sample.numeric[:self.count], sample.categorical[:self.count]
        self.feeds = [{INPUT_NAMES[0]: self.numeric[i:i + 1], INPUT_NAMES[1]: self.categorical[i:i + 1]}
                      for i in range(self.count)]
        self.batch = 1
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def offline_rate(self, batch: int, calls: int = 5) -> float:
        """Samples per second of the worker's loop (model call and responses), to size Offline's query."""
        indices = np.arange(batch) % self.count
        feed = {INPUT_NAMES[0]: self.numeric[indices], INPUT_NAMES[1]: self.categorical[indices]}
        self.session.run([OUTPUT_NAME], feed)
        started = time.perf_counter()
        for _ in range(calls):
            self.session.run([OUTPUT_NAME], {INPUT_NAMES[0]: self.numeric[indices],
                                             INPUT_NAMES[1]: self.categorical[indices]})
            [lg.QuerySampleResponse(i, 0, 0) for i in range(batch)]
        return calls * batch / (time.perf_counter() - started)

    def issue_inline(self, ids: list[int], indices: list[int]) -> None:
        """SingleStream: one sample, answered before LoadGen issues the next."""
        self.session.run([OUTPUT_NAME], self.feeds[indices[0]])
        lg.QuerySamplesComplete([lg.QuerySampleResponse(ids[0], 0, 0)])

    def issue_queued(self, ids: list[int], indices: list[int]) -> None:
        for start in range(0, len(ids), self.batch):
            self._queue.put((ids[start:start + self.batch], indices[start:start + self.batch]))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            ids, indices = item
            if len(ids) == 1:
                self.session.run([OUTPUT_NAME], self.feeds[indices[0]])
            else:
                idx = np.asarray(indices)
                self.session.run([OUTPUT_NAME], {INPUT_NAMES[0]: self.numeric[idx],
                                                 INPUT_NAMES[1]: self.categorical[idx]})
            lg.QuerySamplesComplete([lg.QuerySampleResponse(i, 0, 0) for i in ids])

    def run(self, settings, batch: int, inline: bool, log_dir: Path) -> None:
        self.batch = batch
        worker = None if inline else threading.Thread(target=self._work, name="loadgen-sut", daemon=True)
        if worker is not None:
            worker.start()
        sut = lg.ConstructFastSUT(self.issue_inline if inline else self.issue_queued, lambda: None)
        qsl = lg.ConstructQSL(self.count, self.count, lambda _: None, lambda _: None)
        log = lg.LogSettings()
        log.log_output.outdir = str(log_dir)  # must exist: LoadGen writes its summary and detail logs there
        log.log_output.copy_summary_to_stdout = False
        log.enable_trace = False
        try:
            lg.StartTestWithLogSettings(sut, qsl, settings, log)
        finally:
            if worker is not None:
                self._queue.put(None)
                worker.join()
            lg.DestroyQSL(qsl)
            lg.DestroySUT(sut)


def run_scenario(name: str, sut: _Sut, scenario: str, cfg: BenchConfig, expected_ns: float | None = None,
                 expected_qps: float | None = None) -> ScenarioResult:
    """One MLPerf scenario under LoadGen (PerformanceOnly); the numbers are LoadGen's own.

    LoadGen generates SingleStream's and Offline's queries up front from the expected latency or
    rate: an estimate too optimistic ends the run before its minimum duration (INVALID). Then the
    scenario runs once more, sized from what LoadGen measured.
    """
    result, detail = _run_scenario(name, sut, scenario, cfg, expected_ns, expected_qps)
    if scenario != "Server" and detail.get("result_min_duration_met") is False:
        if scenario == "SingleStream":
            expected_ns = 0.8 * float(detail["result_mean_latency_ns"])
        else:
            expected_qps = 1.5 * result.samples_per_s
        result, _ = _run_scenario(name, sut, scenario, cfg, expected_ns, expected_qps)
    return result


def _run_scenario(name: str, sut: _Sut, scenario: str, cfg: BenchConfig, expected_ns: float | None,
                  expected_qps: float | None) -> tuple[ScenarioResult, dict]:
    settings = lg.TestSettings()
    settings.scenario = getattr(lg.TestScenario, scenario)
    settings.mode = lg.TestMode.PerformanceOnly
    settings.min_query_count = cfg.min_queries
    settings.min_duration_ms = int(cfg.min_seconds * 1000)
    settings.max_duration_ms = int(cfg.max_seconds * 1000)
    settings.qsl_rng_seed = settings.sample_index_rng_seed = settings.schedule_rng_seed = cfg.seed
    if scenario == "SingleStream":  # LoadGen pre-generates min_duration / expected latency queries
        settings.single_stream_expected_latency_ns = max(1_000, int(expected_ns or 1_000_000))
    elif scenario == "Server":
        settings.server_target_qps = cfg.server_qps
        settings.server_target_latency_ns = int(cfg.server_latency_ms * 1e6)
        settings.server_target_latency_percentile = 0.99
    else:
        settings.offline_expected_qps = max(1.0, float(expected_qps or 1.0))
    batch = cfg.offline_batch if scenario == "Offline" else 1
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="loadgen-") as log_dir:
        sut.run(settings, batch, inline=scenario == "SingleStream", log_dir=Path(log_dir))
        detail = read_detail_log(Path(log_dir) / "mlperf_log_detail.txt")
    seconds = time.perf_counter() - started
    return scenario_result(name, sut.session.get_providers()[0], scenario, batch, detail, seconds,
                           cfg.server_qps if scenario == "Server" else None), detail


def read_detail_log(path: Path) -> dict:
    """LoadGen's machine-readable log: one `:::MLLOG {json}` line per key."""
    detail = {}
    for line in path.read_text().splitlines():
        if line.startswith(":::MLLOG "):
            entry = json.loads(line[len(":::MLLOG "):])
            detail[entry["key"]] = entry["value"]
    if "result_validity" not in detail:
        raise RuntimeError(f"LoadGen wrote no result to {path}: {sorted(detail)[:20]}")
    return detail


_ESTIMATE = re.compile(r"Early stopping (\d+(?:\.\d+)?)th percentile estimate: (\d+)")


def scenario_result(name: str, provider: str, scenario: str, batch: int, detail: dict, seconds: float,
                    target_qps: float | None) -> ScenarioResult:
    def ms(key: str) -> float:
        return float(detail[key]) / 1e6

    estimates = {float(p): int(ns) / 1e6 for p, ns in _ESTIMATE.findall(str(detail.get("early_stopping_result", "")))}
    rate_key = {"SingleStream": "result_qps_with_loadgen_overhead", "Server": "result_completed_samples_per_sec",
                "Offline": "result_samples_per_second"}[scenario]
    reason = str(detail.get("result_invalid_reason") or "").strip()
    if detail.get("early_stopping_met") is False:  # LoadGen says how many more queries it would need
        reason = " ".join(filter(None, [reason, "Early stopping: " + " ".join(
            str(detail.get("early_stopping_result", "")).replace("*", "").split())]))
    return ScenarioResult(
        variant=name, provider=provider, scenario=scenario, batch_size=batch,
        queries=int(detail.get("result_query_count", 0)), seconds=seconds,
        p50_ms=ms("result_50.00_percentile_latency_ns"), p90_ms=ms("result_90.00_percentile_latency_ns"),
        p99_ms=ms("result_99.00_percentile_latency_ns"), samples_per_s=float(detail[rate_key]),
        target_qps=target_qps, validity=str(detail["result_validity"]),
        invalid_reason=reason or None,
        early_stopping_met=detail.get("early_stopping_met"),
        early_stopping_p90_ms=estimates.get(90.0), early_stopping_p99_ms=estimates.get(99.0))


def batch_sweep(name: str, session, sample: ModelInput, batch: int, cfg: BenchConfig) -> ScenarioResult:
    """Session time at one batch size (not an MLPerf scenario): how batching amortizes the call."""
    big = _tile(sample, batch)
    feed = {INPUT_NAMES[0]: big.numeric, INPUT_NAMES[1]: big.categorical}
    session.run([OUTPUT_NAME], feed)
    times = []
    started = time.perf_counter()
    while len(times) < max(5, cfg.min_queries // max(1, batch)) or time.perf_counter() - started < cfg.min_seconds:
        times.append(_elapsed_ms(session, feed))
    elapsed = time.perf_counter() - started
    times_ms = np.array(times)
    return ScenarioResult(variant=name, provider=session.get_providers()[0], scenario=f"Batch{batch}",
                          batch_size=batch, queries=len(times), seconds=elapsed,
                          p50_ms=float(np.percentile(times_ms, 50)), p90_ms=float(np.percentile(times_ms, 90)),
                          p99_ms=float(np.percentile(times_ms, 99)), samples_per_s=len(times) * batch / elapsed)


def cost_per_million(samples_per_s: float, price_per_hour: float) -> float:
    """Dollars per one million predictions at a sustained throughput."""
    return price_per_hour / (samples_per_s * 3600.0) * 1e6 if samples_per_s > 0 else float("inf")


def _elapsed_ms(session, feed: dict) -> float:
    t0 = time.perf_counter()
    session.run([OUTPUT_NAME], feed)
    return (time.perf_counter() - t0) * 1e3


def _tile(sample: ModelInput, rows: int) -> ModelInput:
    return sample.take(np.arange(rows) % len(sample))
