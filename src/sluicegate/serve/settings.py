"""Serving settings, read from SLUICEGATE_SERVE_* environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICEGATE_SERVE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8080
    # Server processes sharing the port. The online state is shared by all of them (SQLite under the
    # home, or Redis); each has its own model session, prediction log writer and /metrics counters.
    workers: int = Field(1, ge=1)
    # Concurrent requests share one onnxruntime call, up to this many rows.
    max_batch_rows: int = Field(64, ge=1)
    # How long the batcher waits for more requests once one is queued. 0 batches whatever arrived
    # while the previous call ran and by the event loop's next turn: no wait when idle.
    max_wait_ms: float = Field(0.0, ge=0.0)
    # Model calls on the event loop (fastest for small models on few cores) or in a worker thread
    # (large models, GPUs: the call is long and releases the GIL).
    run_in_thread: bool = False
    # onnxruntime intra-op threads; 1 suits small models (the event loop needs the other core).
    threads: int = Field(1, ge=0)
    # onnxruntime execution providers; empty: the target's (SLUICEGATE_TARGET, hardware.yaml), the one
    # setting the pipeline and `deploy` read too. A list must start with the target's provider; what
    # follows is a fallback the operator allows. A provider that is not installed stops the server.
    providers: list[str] = []
    # How often the registry is asked whether `champion` moved.
    poll_interval_s: float = Field(5.0, gt=0)
    # Comma-separated keys; empty means inference endpoints are open.
    api_keys: str = ""
    # With keys set, require one on /metrics too (give Prometheus the key as a bearer token).
    metrics_auth: bool = False
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_rows_per_request: int = Field(1024, ge=1)
    # Prediction log: a queue of at most this many model calls (and, while writes fail, rows kept for
    # the next try); what does not fit is dropped and counted, never waited for.
    log_queue_size: int = Field(100_000, ge=1)
    log_predictions: bool = True
    # A parquet file per flush under SLUICEGATE_HOME/predictions/<endpoint>/.
    log_flush_s: float = Field(1.0, gt=0)
    # Export a Triton/KServe model repository for each champion the server loads.
    export_repository: bool = True

    def keys(self) -> list[str]:
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]
