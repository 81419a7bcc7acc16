"""Prometheus metrics, on a registry of the app's own (several apps may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, values

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def keep_values_in_memory() -> None:
    """`import feast` sets PROMETHEUS_MULTIPROC_DIR (for Gunicorn workers of its own server), which
    turns every prometheus_client metric in the process into a value in an mmap'ed file: a file
    write under a lock per update (about 5 of the ~45 us the app spends on a request here). The model
    server is one process, so its metrics keep their values in memory whatever was imported first."""
    values.ValueClass = values.MutexValue


class Metrics:
    def __init__(self):
        keep_values_in_memory()
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sluicegate_requests_total", "Requests answered", ["endpoint", "code"], registry=r)
        self.latency = Histogram("sluicegate_request_latency_seconds", "Server-side latency", ["endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("sluicegate_batch_rows", "Rows per model call", ["endpoint"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.model_version = Gauge("sluicegate_model_version", "Version now serving (0: none)", ["model"],
                                   registry=r)
        self.reloads = Counter("sluicegate_model_reloads_total", "Champion loads", ["outcome"], registry=r)
        self.log_dropped = Counter("sluicegate_prediction_log_dropped_total",
                                   "Prediction-log rows dropped (queue full, or beyond the bound while writes fail)",
                                   registry=r)
        self.log_write_errors = Counter("sluicegate_prediction_log_write_errors_total",
                                        "Failed prediction-log writes (disk full, ...); records are kept and retried",
                                        registry=r)
        self.log_failing = Gauge("sluicegate_prediction_log_failing", "1 while prediction-log writes fail",
                                 registry=r)
        self.log_depth = Gauge("sluicegate_prediction_log_queue_depth",
                               "Prediction-log records (model calls) waiting", registry=r)
        # Children resolved once: .labels() on every request costs more than the observation.
        self._children: dict = {}

    def observe(self, endpoint: str, code: int, seconds: float) -> None:
        key = (endpoint, code)
        pair = self._children.get(key)
        if pair is None:
            pair = (self.requests.labels(endpoint, str(code)), self.latency.labels(endpoint))
            self._children[key] = pair
        pair[0].inc()
        pair[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
