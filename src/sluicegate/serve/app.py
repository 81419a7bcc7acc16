"""The model server: a raw ASGI app (no framework on the hot path) run by uvicorn.

Routes: Open Inference Protocol v2 under /v2 (one model per spec it serves), the business endpoint
/predict (the first spec's model; /predict/{name} for any), Prometheus /metrics and the OpenAPI
document /openapi.json.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from sluicegate import __version__ as package_version
from sluicegate.config import Settings
from sluicegate.serve import openapi, v2
from sluicegate.serve import predict as business
from sluicegate.serve.errors import BadRequest, Unavailable
from sluicegate.serve.metrics import Metrics
from sluicegate.serve.model import LoadedModel
from sluicegate.serve.served import ServedModel
from sluicegate.serve.settings import ServeSettings
from sluicegate.ship import registry

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
    """ASGI application serving one model per spec. Everything heavy starts in the lifespan."""

    def __init__(self, settings: Settings | list[Settings] | None = None, serve: ServeSettings | None = None):
        self.serve = serve or ServeSettings()
        self.metrics = Metrics()
        tables = settings if isinstance(settings, list) else [settings or Settings()]
        self.models: dict[str, ServedModel] = {}
        for table in tables:
            served = ServedModel(table, self.serve, self.metrics)
            if served.name in self.models:
                raise ValueError(f"two specs register the model {served.name!r}; give one a different model_name")
            self.models[served.name] = served
        # /predict without a name answers for the first spec, as a one-model server always has.
        self.default = next(iter(self.models.values()))
        self.keys = [k.encode() for k in self.serve.keys()]
        self._poller: asyncio.Task | None = None
        self._openapi: dict[tuple, bytes] = {}  # by the served contracts: /predict's schema follows the champion
        self._routes = {
            "/v2/health/live": self._live, "/v2/health/ready": self._ready, "/v2": self._server_metadata,
            "/metrics": self._metrics, "/openapi.json": self._openapi_doc, "/predict": self._predict,
            "/events": self._events,
        }

    # ------------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        for served in self.models.values():
            await served.startup()
        self._poller = asyncio.get_running_loop().create_task(self._poll(), name="champion-poller")
        # Everything imported and loaded so far lives as long as the server: move it out of the
        # collector's view, so a full collection under load scans only request garbage instead of
        # the whole heap of MLflow, Feast and onnxruntime objects (pauses of ~200 ms at p99 otherwise).
        gc.collect()
        gc.freeze()

    async def shutdown(self) -> None:
        """Stop polling, answer what is queued, then flush the prediction logs."""
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
        for served in self.models.values():
            await served.shutdown()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.serve.poll_interval_s)
            for served in self.models.values():
                await served.refresh()

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
            elif path.startswith("/events/"):
                endpoint = "events"
                answer = await self._events(method, scope, receive, started, self._model(path[len("/events/"):]))
            elif path.startswith("/predict/"):
                endpoint = "predict"
                answer = await self._predict(method, scope, receive, started, self._model(path[len("/predict/"):]))
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

    def _model(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise BadRequest(f"unknown model {name!r}; this server serves {', '.join(map(repr, self.models))}", 404)
        return served

    @staticmethod
    def _method(method: str, allowed: str) -> None:
        if method != allowed:
            raise BadRequest(f"method {method} not allowed here; use {allowed}", 405, allow=allowed)

    # ------------------------------------------------------------------ plain routes

    def _degraded(self) -> dict:
        """What still works but needs an operator: shown on the health routes, never fails them."""
        problems = [p for served in self.models.values() for p in served.problems()]
        return {"degraded": problems} if problems else {}

    async def _live(self, method, scope, receive, started) -> Answer:
        self._method(method, "GET")
        return _json(200, {"live": True, **self._degraded()})

    async def _ready(self, method, scope, receive, started) -> Answer:
        """Ready once every model it serves has a champion loaded."""
        self._method(method, "GET")
        loaded = [served.serving() for served in self.models.values()]
        first = loaded[0]
        return _json(200, {"ready": True, "model": first.name, "version": first.version,
                           "models": [{"name": m.name, "version": m.version} for m in loaded], **self._degraded()})

    async def _server_metadata(self, method, scope, receive, started) -> Answer:
        self._method(method, "GET")
        return _json(200, {"name": "sluicegate", "version": package_version, "extensions": ["binary_tensor_data"]})

    async def _metrics(self, method, scope, receive, started) -> Answer:
        self._method(method, "GET")
        if self.serve.metrics_auth:
            self._authorize(scope)
        logs = [served.predlog for served in self.models.values() if served.predlog is not None]
        if logs:
            self.metrics.log_depth.set(sum(predlog.depth() for predlog in logs))
            self.metrics.log_failing.set(1.0 if any(predlog.error for predlog in logs) else 0.0)
        return Answer(200, self.metrics.render(), b"text/plain; version=0.0.4; charset=utf-8")

    async def _openapi_doc(self, method, scope, receive, started) -> Answer:
        self._method(method, "GET")
        contracts = [m.contract() for m in self.models.values()]
        key = tuple(c.key for c in contracts)
        if key not in self._openapi:
            self._openapi[key] = orjson.dumps(openapi.document(
                [(c.spec, m.name) for c, m in zip(contracts, self.models.values(), strict=True)], bool(self.keys),
                metrics_secured=bool(self.keys) and self.serve.metrics_auth))
        return Answer(200, self._openapi[key])

    # ------------------------------------------------------------------ v2 model routes

    async def _model_route(self, path, method, scope, receive, started) -> tuple[str, Answer]:
        """/v2/models/{name}[/versions/{version}][/ready|/infer]"""
        parts = path.split("/")[3:]
        served, rest = self._model(parts[0]), parts[1:]
        version = None
        if rest[:1] == ["versions"] and len(rest) >= 2:
            version, rest = rest[1], rest[2:]
        action = rest[0] if rest else ""
        if len(rest) > 1 or action not in ("", "ready", "infer"):
            raise BadRequest(f"no route {path}", 404)
        if action == "infer":
            return "v2_infer", await self._infer(served, method, scope, receive, started, version)
        self._method(method, "GET")
        model = served.serving()
        self._check_version(model, version)
        if action == "ready":
            return "v2_model_ready", _json(200, {"name": model.name, "ready": True, "version": model.version})
        return "v2_model", _json(200, v2.model_metadata(model.name, model.version, *served.contract_of(model).widths))

    @staticmethod
    def _check_version(model: LoadedModel, version: str | None) -> None:
        if version is not None and version != model.version:
            raise BadRequest(f"version {version!r} is not served; {model.name} serves version {model.version}", 404)

    async def _infer(self, served: ServedModel, method, scope, receive, started, version) -> Answer:
        self._method(method, "POST")
        self._authorize(scope)
        self._check_version(served.serving(), version)
        body, header_length = await self._read_body(scope, receive)
        contract = served.contract()
        request = v2.parse_infer(body, header_length, contract.numeric_names, contract.code_limits,
                                 self.serve.max_rows_per_request)
        request.received = started
        probs, model = await served.v2_batcher.submit(request, request.rows)
        if version is not None and version != model.version:  # the champion moved while queued
            raise Unavailable(f"version {version} was replaced by {model.version} during the request; retry")
        out, extra = v2.infer_response(model.name, model.version, request.id, probs, request.binary_output)
        headers = tuple((k.encode(), v.encode()) for k, v in extra.items()) if extra else ()
        return Answer(200, out, b"application/octet-stream" if extra else JSON, headers)

    # ------------------------------------------------------------------ /predict

    async def _predict(self, method, scope, receive, started, served: ServedModel | None = None) -> Answer:
        """/predict answers for the first spec's model, /predict/{name} for any."""
        served = served or self.default
        self._method(method, "POST")
        self._authorize(scope)
        served.serving()
        body, _ = await self._read_body(scope, receive)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from None
        contract = served.contract()
        request = business.parse_predict(data, contract.spec)
        request.received, request.contract = started, contract.key
        prob, model = await served.predict_batcher.submit(request, 1)
        answer = {"id": request.id, "probability": prob, "positive": prob >= model.threshold,
                  "threshold": model.threshold, "model_name": model.name, "model_version": model.version}
        return _json(200, answer)


    async def _events(self, method, scope, receive, started, served: ServedModel | None = None) -> Answer:
        """Events scored elsewhere, counted in the online state without scoring: one row or a list of rows
        of /predict's schema (an id makes a resent row count once). Every row is checked first, and a
        bad one refuses the whole body (422); a row the state cannot hold exactly (older than it keeps)
        is listed under `refused`, the others are recorded."""
        served = served or self.default
        self._method(method, "POST")
        self._authorize(scope)
        body, _ = await self._read_body(scope, receive)
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from None
        rows = data if isinstance(data, list) else [data]
        if not rows or len(rows) > self.serve.max_rows_per_request:
            raise BadRequest(f"send 1 to {self.serve.max_rows_per_request} events, got {len(rows)}",
                             413 if rows else 422)
        requests = []
        for i, row in enumerate(rows):
            try:
                requests.append(business.parse_predict(row, served.contract().spec))
            except BadRequest as exc:
                raise BadRequest(f"event {i}: {exc}", exc.status, [{"event": i, **d} for d in exc.details]) from None
        refused = served.record_events(requests)
        return _json(200, {"accepted": len(requests) - len(refused),
                           "refused": [{"event": i, "error": why} for i, why in refused]})


def create_app(settings: Settings | list[Settings] | None = None, serve: ServeSettings | None = None) -> ServingApp:
    return ServingApp(settings, serve)


def uvicorn_config(app, serve: ServeSettings, **more):
    """uvicorn on uvloop + httptools, no access log, no proxy-header middleware."""
    import uvicorn

    return uvicorn.Config(app, host=serve.host, port=serve.port, loop="uvloop", http="httptools",
                          access_log=False, log_level="warning", lifespan="on", timeout_graceful_shutdown=10,
                          # Nothing here reads the client address: skip the X-Forwarded-For rewrite (~7% of CPU).
                          proxy_headers=False, **more)


# What each worker process of a multi-process server builds its app from (set by `run`).
WORKER_SPECS = "SLUICEGATE_SERVE_WORKER_SPECS"
WORKER_SETTINGS = "SLUICEGATE_SERVE_WORKER_SETTINGS"


def worker_app() -> ServingApp:
    """The app of one worker process: the parent's specs and serve settings, from its environment."""
    specs = json.loads(os.environ[WORKER_SPECS])
    return create_app([Settings(spec_path=Path(p)) for p in specs],
                      ServeSettings.model_validate_json(os.environ[WORKER_SETTINGS]))


def run(settings: Settings | list[Settings] | None = None, serve: ServeSettings | None = None) -> None:
    """Serve until SIGINT/SIGTERM; shutdown drains queued requests and the prediction log. With more than
    one worker, uvicorn's supervisor binds the port and starts that many processes of `worker_app`."""
    import uvicorn

    serve = serve or ServeSettings()
    if serve.workers == 1:
        uvicorn.Server(uvicorn_config(create_app(settings, serve), serve)).run()
        return
    tables = settings if isinstance(settings, list) else [settings or Settings()]
    for table in tables:  # an embedded MLflow store is created here once: workers racing to create it corrupt it
        try:
            registry.configure(table)
        except Exception as exc:  # unreachable now: each worker keeps asking, as one server does
            log.error("cannot reach the registry of %s before starting the workers: %s", table.model_name, exc)
    os.environ[WORKER_SPECS] = json.dumps([str(Path(t.spec_path).resolve()) for t in tables])
    os.environ[WORKER_SETTINGS] = serve.model_dump_json()
    config = uvicorn_config("sluicegate.serve.app:worker_app", serve, factory=True, workers=serve.workers)
    sock = config.bind_socket()
    from uvicorn.supervisors import Multiprocess

    Multiprocess(config, sockets=[sock]).run()
