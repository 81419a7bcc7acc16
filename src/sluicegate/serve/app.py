"""The model server: a raw ASGI app (no framework on the hot path) run by uvicorn.

Routes: Open Inference Protocol v2 under /v2, the business endpoint /predict,
Prometheus /metrics and the OpenAPI document /openapi.json.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np
import orjson

from sluicegate import __version__ as package_version
from sluicegate.config import Settings
from sluicegate.features import catalog
from sluicegate.features.inputs import cardinalities, numeric_inputs, tensor_widths
from sluicegate.serve import openapi, v2
from sluicegate.serve import predict as business
from sluicegate.serve.batcher import MicroBatcher
from sluicegate.serve.errors import BadRequest, Unavailable
from sluicegate.serve.metrics import Metrics
from sluicegate.serve.model import LoadedModel, ModelManager
from sluicegate.serve.predlog import PredictionLog, Record
from sluicegate.serve.settings import ServeSettings
from sluicegate.ship import model_repository, registry
from sluicegate.spec import load_spec

log = logging.getLogger("sluicegate.serve")

JSON = b"application/json"
HEADER_LENGTH = v2.HEADER_LENGTH.encode()


class ClientGone(Exception):
    """The client disconnected before its body arrived."""


@dataclass(slots=True)
class Answer:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple = ()


def _json(status: int, obj) -> Answer:
    return Answer(status, orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY))


def _error(status: int, message: str, details: list | None = None) -> Answer:
    return _json(status, {"error": message, "details": details} if details else {"error": message})


class ServingApp:
    """ASGI application. Everything heavy starts in the lifespan, nothing at construction."""

    def __init__(self, settings: Settings | None = None, serve: ServeSettings | None = None):
        self.settings = settings or Settings()
        self.serve = serve or ServeSettings()
        self.spec = load_spec(self.settings.spec_path)
        self.cardinalities = cardinalities(self.spec)
        self.numeric_names = numeric_inputs(self.spec)
        self.widths = tensor_widths(self.spec)
        self._code_limits = np.asarray(self.cardinalities, dtype=np.uint64)
        self.model_name = registry.check_model_name(self.settings.model_name)
        self.keys = [k.encode() for k in self.serve.keys()]
        self.metrics = Metrics()
        self.manager = ModelManager(self.settings, self.serve.threads, self.serve.providers,
                                    self.widths, on_loaded=self._on_loaded,
                                    on_rejected=lambda version, why: self.metrics.reloads.labels("rejected").inc())
        wait = self.serve.max_wait_ms / 1000.0
        self.v2_batcher = MicroBatcher(self._run_v2, self.serve.max_batch_rows, wait, "v2-batcher",
                                       on_batch=self.metrics.batch_rows.labels("v2_infer").observe,
                                       in_thread=self.serve.run_in_thread)
        self.predict_batcher = MicroBatcher(self._run_predict, self.serve.max_batch_rows, wait, "predict-batcher",
                                            on_batch=self.metrics.batch_rows.labels("predict").observe,
                                            in_thread=self.serve.run_in_thread)
        self.predlog: PredictionLog | None = None
        self._registry_error: str | None = None  # the last poll's failure; None once a poll succeeds
        self._lookup: business.FeatureLookup | None = None
        self._poller: asyncio.Task | None = None
        self._openapi = orjson.dumps(openapi.document(self.spec, self.model_name, bool(self.keys),
                                                      metrics_secured=bool(self.keys) and self.serve.metrics_auth))
        self._routes = {
            "/v2/health/live": self._live, "/v2/health/ready": self._ready, "/v2": self._server_metadata,
            "/metrics": self._metrics, "/openapi.json": self._openapi_doc, "/predict": self._predict,
        }

    # ------------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        if self.serve.log_predictions:
            self.predlog = PredictionLog(
                self.settings.paths.predictions, self.serve.log_queue_size, self.serve.log_flush_s,
                expand={"numeric": self.numeric_names, "categorical": list(self.spec.categorical_features)},
                on_drop=self.metrics.log_dropped.inc, on_error=self.metrics.log_write_errors.inc)
        await self._refresh()
        self.v2_batcher.start()
        self.predict_batcher.start()
        self._poller = asyncio.get_running_loop().create_task(self._poll(), name="champion-poller")
        # Everything imported and loaded so far lives as long as the server: move it out of the
        # collector's view, so a full collection under load scans only request garbage instead of
        # the whole heap of MLflow, Feast and onnxruntime objects (pauses of ~200 ms at p99 otherwise).
        gc.collect()
        gc.freeze()

    async def shutdown(self) -> None:
        """Stop polling, answer what is queued, then flush the prediction log."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        await self.v2_batcher.stop()
        await self.predict_batcher.stop()
        if self.predlog is not None:
            await asyncio.to_thread(self.predlog.close)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.serve.poll_interval_s)
            await self._refresh()

    async def _refresh(self) -> None:
        try:
            await asyncio.to_thread(self.manager.refresh)
        except Exception as exc:  # registry unreachable: keep serving, try again next poll
            self._registry_error = f"{type(exc).__name__}: {exc}"
            log.error("cannot ask the registry for the champion: %s", exc)
        else:
            self._registry_error = None

    def _on_loaded(self, model: LoadedModel) -> None:
        self.metrics.reloads.labels("loaded").inc()
        self.metrics.model_version.labels(model.name).set(float(model.version))
        if self.serve.export_repository:
            try:
                model_repository.write_version(self.settings.paths.model_repository, model.name,
                                               model.version, model.onnx_bytes, self.widths)
            except OSError as exc:  # exporting is a convenience; serving goes on
                log.error("model repository export failed: %s", exc)

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("startup failed")
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope, receive, send) -> None:
        started = time.perf_counter()
        path, method = scope["path"], scope["method"]
        endpoint = "other"
        try:
            if path.startswith("/v2/models/"):
                endpoint, answer = await self._model_route(path, method, scope, receive, started)
            else:
                handler = self._routes.get(path)
                if handler is None:
                    answer = _error(404, f"no route {path}")
                else:
                    endpoint = handler.__name__.lstrip("_")
                    answer = await handler(method, scope, receive, started)
        except BadRequest as exc:
            answer = _error(exc.status, str(exc), exc.details)
            if exc.allow:
                answer.headers = ((b"allow", exc.allow.encode()),)
        except Unavailable as exc:
            answer = _error(503, str(exc))
        except ClientGone:
            return
        except Exception:
            log.exception("unexpected error on %s %s", method, path)
            answer = _error(500, "internal error; the server log has the details")
        headers = [(b"content-type", answer.content_type), (b"content-length", str(len(answer.body)).encode())]
        headers.extend(answer.headers)
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})
        self.metrics.observe(endpoint, answer.status, time.perf_counter() - started)

    # ------------------------------------------------------------------ plumbing

    def _authorize(self, scope) -> None:
        if not self.keys:
            return
        given = None
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
            elif name == b"x-api-key":
                given = value.strip()
        if given is None or not any(hmac.compare_digest(given, key) for key in self.keys):
            raise BadRequest("missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key'", 401)

    async def _read_body(self, scope, receive) -> tuple[bytes, str | None]:
        """The body, and v2's Inference-Header-Content-Length if sent (found in the same pass over the headers)."""
        limit = self.serve.max_body_bytes
        header_length = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit():
                    raise BadRequest("Content-Length must be a number")
                if int(value) > limit:
                    raise BadRequest(f"body of {int(value)} bytes exceeds the limit of {limit}", 413)
            elif name == HEADER_LENGTH:
                header_length = value.decode("latin-1")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"body exceeds the limit of {limit} bytes", 413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return (chunks[0] if len(chunks) == 1 else b"".join(chunks)), header_length

    def _serving(self) -> LoadedModel:
        model = self.manager.current
        if model is None:
            last = f"registry: {self._registry_error}" if self._registry_error else self.manager.last_error
            why = f": {last}" if last else ""
            raise Unavailable(f"no model loaded yet for {self.model_name}@champion{why}")
        return model

    @staticmethod
    def _method(method: str, allowed: str) -> None:
        if method != allowed:
            raise BadRequest(f"method {method} not allowed here; use {allowed}", 405, allow=allowed)

    # ------------------------------------------------------------------ plain routes

    def _degraded(self) -> dict:
        """What still works but needs an operator: shown on the health routes, never fails them."""
        problems = []
        if self.predlog is not None and self.predlog.error:
            problems.append(f"prediction log not written: {self.predlog.error}")
        if self._registry_error:
            problems.append(f"registry unreachable, new champions are not picked up: {self._registry_error}")
        return {"degraded": problems} if problems else {}

    async def _live(self, method, scope, receive, started) -> Answer:
        self._method(method, "GET")
        return _json(200, {"live": True, **self._degraded()})

    async def _ready(self, method, scope, receive, started) -> Answer:
        self._method(method, "GET")
        model = self._serving()
        return _json(200, {"ready": True, "model": model.name, "version": model.version, **self._degraded()})

    async def _server_metadata(self, method, scope, receive, started) -> Answer:
        self._method(method, "GET")
        return _json(200, {"name": "sluicegate", "version": package_version, "extensions": ["binary_tensor_data"]})

    async def _metrics(self, method, scope, receive, started) -> Answer:
        self._method(method, "GET")
        if self.serve.metrics_auth:
            self._authorize(scope)
        if self.predlog is not None:
            self.metrics.log_depth.set(self.predlog.depth())
            self.metrics.log_failing.set(1.0 if self.predlog.error else 0.0)
        return Answer(200, self.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8")

    async def _openapi_doc(self, method, scope, receive, started) -> Answer:
        self._method(method, "GET")
        return Answer(200, self._openapi)

    # ------------------------------------------------------------------ v2 model routes

    async def _model_route(self, path, method, scope, receive, started) -> tuple[str, Answer]:
        """/v2/models/{name}[/versions/{version}][/ready|/infer]"""
        parts = path.split("/")[3:]
        name, rest = parts[0], parts[1:]
        if name != self.model_name:
            raise BadRequest(f"unknown model {name!r}; this server serves {self.model_name!r}", 404)
        version = None
        if rest[:1] == ["versions"] and len(rest) >= 2:
            version, rest = rest[1], rest[2:]
        action = rest[0] if rest else ""
        if len(rest) > 1 or action not in ("", "ready", "infer"):
            raise BadRequest(f"no route {path}", 404)
        if action == "infer":
            return "v2_infer", await self._infer(method, scope, receive, started, version)
        self._method(method, "GET")
        model = self._serving()
        self._check_version(model, version)
        if action == "ready":
            return "v2_model_ready", _json(200, {"name": model.name, "ready": True, "version": model.version})
        return "v2_model", _json(200, v2.model_metadata(model.name, model.version, *self.widths))

    @staticmethod
    def _check_version(model: LoadedModel, version: str | None) -> None:
        if version is not None and version != model.version:
            raise BadRequest(f"version {version!r} is not served; {model.name} serves version {model.version}", 404)

    async def _infer(self, method, scope, receive, started, version) -> Answer:
        self._method(method, "POST")
        self._authorize(scope)
        self._check_version(self._serving(), version)
        body, header_length = await self._read_body(scope, receive)
        request = v2.parse_infer(body, header_length, self.numeric_names, self._code_limits,
                                 self.serve.max_rows_per_request)
        request.received = started
        probs, model = await self.v2_batcher.submit(request, request.rows)
        if version is not None and version != model.version:  # the champion moved while queued
            raise Unavailable(f"version {version} was replaced by {model.version} during the request; retry")
        out, extra = v2.infer_response(model.name, model.version, request.id, probs, request.binary_output)
        headers = tuple((k.encode(), v.encode()) for k, v in extra.items()) if extra else ()
        return Answer(200, out, b"application/octet-stream" if extra else JSON, headers)

    def _run_v2(self, requests: list[v2.InferRequest]) -> list[tuple[np.ndarray, LoadedModel]]:
        """One onnxruntime call for every queued request."""
        model = self._serving()
        if len(requests) == 1:
            numeric, categorical = requests[0].numeric, requests[0].categorical
        else:
            numeric = np.concatenate([r.numeric for r in requests])
            categorical = np.concatenate([r.categorical for r in requests])
        probs = model.run(numeric, categorical)
        rows = [r.rows for r in requests]
        self._log("v2", requests, rows, model, probs, {"numeric": numeric, "categorical": categorical})
        bounds = [0, *itertools.accumulate(rows)]
        return [(probs[a:b], model) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def _log(self, endpoint: str, requests: list, rows: list[int], model: LoadedModel, probs: np.ndarray,
             features: dict, threshold: float | None = None) -> None:
        """One prediction-log record for the whole model call."""
        if self.predlog is None:
            return
        now = time.perf_counter()
        self.predlog.put(Record(endpoint, time.time(), model.name, model.version, [r.id for r in requests],
                                [(now - r.received) * 1000.0 for r in requests], rows, probs, features, threshold))

    # ------------------------------------------------------------------ /predict

    async def _predict(self, method, scope, receive, started) -> Answer:
        self._method(method, "POST")
        self._authorize(scope)
        self._serving()
        body, _ = await self._read_body(scope, receive)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from None
        request = business.parse_predict(data, self.spec)
        request.received = started
        prob, model = await self.predict_batcher.submit(request, 1)
        answer = {"id": request.id, "probability": prob, "positive": prob >= model.threshold,
                  "threshold": model.threshold, "model_name": model.name, "model_version": model.version}
        return _json(200, answer)

    def _feature_lookup(self) -> business.FeatureLookup:
        """Created on first use, in the worker thread; a failed start is retried on the next batch."""
        if self._lookup is None:
            from sluicegate.features.store import feature_store

            try:
                self._lookup = business.FeatureLookup(feature_store(self.settings, self.spec), self.spec)
            except Exception as exc:
                raise Unavailable(f"online feature store unavailable: {type(exc).__name__}: {exc}") from exc
        return self._lookup

    def _run_predict(self, requests: list[business.PredictRequest]) -> list[tuple[float, LoadedModel]]:
        """One Feast lookup, one input build and one model call for the whole batch."""
        model = self._serving()
        found = self._feature_lookup().fetch(requests) if catalog.served_entities(self.spec) else {}
        data = business.model_input(requests, found, self.spec)
        probs = model.run(data.numeric, data.categorical)
        self._log("predict", requests, [1] * len(requests), model, probs,
                  business.feature_columns(requests, found), model.threshold)
        return [(p, model) for p in probs.tolist()]


def create_app(settings: Settings | None = None, serve: ServeSettings | None = None) -> ServingApp:
    return ServingApp(settings, serve)


def uvicorn_config(app: ServingApp, serve: ServeSettings):
    """uvicorn on uvloop + httptools, no access log, no proxy-header middleware."""
    import uvicorn

    return uvicorn.Config(app, host=serve.host, port=serve.port, loop="uvloop", http="httptools",
                          access_log=False, log_level="warning", lifespan="on", timeout_graceful_shutdown=10,
                          # Nothing here reads the client address: skip the X-Forwarded-For rewrite (~7% of CPU).
                          proxy_headers=False)


def run(settings: Settings | None = None, serve: ServeSettings | None = None) -> None:
    """Serve until SIGINT/SIGTERM; shutdown drains queued requests and the prediction log."""
    import uvicorn

    serve = serve or ServeSettings()
    uvicorn.Server(uvicorn_config(create_app(settings, serve), serve)).run()

