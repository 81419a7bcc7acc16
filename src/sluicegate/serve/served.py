"""One served model: a spec's champion with its tensor contract, batchers, prediction log and
feature lookup. The server holds one per `--spec`; nothing here speaks HTTP."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import numpy as np

from sluicegate.config import Settings
from sluicegate.features import catalog
from sluicegate.features.inputs import cardinalities, logged_inputs, numeric_inputs, tensor_widths
from sluicegate.features.online import OnlineFeatures, open_state
from sluicegate.serve import predict as business
from sluicegate.serve import privacy, v2
from sluicegate.serve.batcher import MicroBatcher
from sluicegate.serve.errors import Unavailable
from sluicegate.serve.metrics import Metrics
from sluicegate.serve.model import LoadedModel, ModelManager
from sluicegate.serve.predlog import PredictionLog, Record
from sluicegate.serve.settings import ServeSettings
from sluicegate.ship import model_repository, registry

log = logging.getLogger("sluicegate.serve")


class ServedModel:
    """A spec's `model_name@champion`. Everything heavy starts in `startup`, nothing at construction."""

    def __init__(self, settings: Settings, serve: ServeSettings, metrics: Metrics):
        self.settings = settings
        self.serve = serve
        self.metrics = metrics
        self.spec = settings.spec
        self.name = registry.check_model_name(settings.model_name)
        self.numeric_names = numeric_inputs(self.spec)
        self.widths = tensor_widths(self.spec)
        self.code_limits = np.asarray(cardinalities(self.spec), dtype=np.uint64)
        self.manager = ModelManager(settings, serve.threads, serve.providers, self.widths,
                                    on_loaded=self._on_loaded,
                                    on_rejected=lambda version, why: metrics.reloads.labels("rejected").inc())
        wait = serve.max_wait_ms / 1000.0
        self.v2_batcher = MicroBatcher(self._run_v2, serve.max_batch_rows, wait, f"v2-batcher-{self.name}",
                                       on_batch=metrics.batch_rows.labels("v2_infer").observe,
                                       in_thread=serve.run_in_thread)
        self.predict_batcher = MicroBatcher(self._run_predict, serve.max_batch_rows, wait,
                                            f"predict-batcher-{self.name}",
                                            on_batch=metrics.batch_rows.labels("predict").observe,
                                            in_thread=serve.run_in_thread)
        self.predlog: PredictionLog | None = None
        self.registry_error: str | None = None  # the last poll's failure; None once a poll succeeds
        self._lookup: business.FeatureLookup | None = None

    # ------------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        if self.serve.log_predictions:
            self.predlog = PredictionLog(
                self.settings.paths.predictions, self.serve.log_queue_size, self.serve.log_flush_s,
                expand=logged_inputs(self.spec), redact=privacy.log_redactor(self.settings.spec, self.settings.paths),
                on_drop=self.metrics.log_dropped.inc, on_error=self.metrics.log_write_errors.inc)
        await self.refresh()
        self.v2_batcher.start()
        self.predict_batcher.start()

    async def shutdown(self) -> None:
        """Answer what is queued, then flush the prediction log."""
        await self.v2_batcher.stop()
        await self.predict_batcher.stop()
        await self.shutdown_state()
        if self.predlog is not None:
            await asyncio.to_thread(self.predlog.close)

    async def refresh(self) -> None:
        try:
            await asyncio.to_thread(self.manager.refresh)
        except Exception as exc:  # registry unreachable: keep serving, try again next poll
            self.registry_error = f"{type(exc).__name__}: {exc}"
            log.error("cannot ask the registry for %s's champion: %s", self.name, exc)
        else:
            self.registry_error = None

    def _on_loaded(self, model: LoadedModel) -> None:
        self.metrics.reloads.labels("loaded").inc()
        self.metrics.model_version.labels(model.name).set(float(model.version))
        if self.serve.export_repository:
            try:
                model_repository.write_version(self.settings.paths.model_repository, model.name,
                                               model.version, model.onnx_bytes, self.widths)
            except OSError as exc:  # exporting is a convenience; serving goes on
                log.error("model repository export failed: %s", exc)

    # ------------------------------------------------------------------ state

    def serving(self) -> LoadedModel:
        model = self.manager.current
        if model is None:
            last = f"registry: {self.registry_error}" if self.registry_error else self.manager.last_error
            why = f": {last}" if last else ""
            raise Unavailable(f"no model loaded yet for {self.name}@champion{why}")
        return model

    def problems(self) -> list[str]:
        """What still works but needs an operator."""
        problems = []
        if self.predlog is not None and self.predlog.error:
            problems.append(f"{self.name}: prediction log not written: {self.predlog.error}")
        if self.registry_error:
            problems.append(f"{self.name}: registry unreachable, new champions are not picked up: "
                            f"{self.registry_error}")
        if self.manager.fetch_error:
            problems.append(f"{self.name}: the new champion could not be fetched, retried at the next poll: "
                            f"{self.manager.fetch_error}")
        return problems

    # ------------------------------------------------------------------ model calls

    def _run_v2(self, requests: list[v2.InferRequest]) -> list[tuple[np.ndarray, LoadedModel]]:
        """One onnxruntime call for every queued request."""
        model = self.serving()
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

    def _feature_lookup(self) -> business.FeatureLookup:
        """Opened on first use; a failed open is retried on the next batch."""
        if self._lookup is None:
            try:
                state = open_state(self.settings, self.spec, serving=True)
                self._lookup = business.FeatureLookup(OnlineFeatures(self.spec, state))
            except Exception as exc:
                raise Unavailable(f"online feature store unavailable: {type(exc).__name__}: {exc}") from exc
        return self._lookup

    def _run_predict(self, requests: list[business.PredictRequest]) -> list:
        """One online-state transaction, one input build and one model call for the whole batch; a request
        the state refused gets its error."""
        model = self.serving()
        refused: list = [None] * len(requests)
        found: dict = {}
        if catalog.served_entities(self.spec):
            found, refused = self._feature_lookup().fetch(requests)
        kept = [i for i, why in enumerate(refused) if why is None]
        answers: list = list(refused)
        if kept:
            scored = [requests[i] for i in kept]
            features = {name: values[kept] for name, values in found.items()}
            data = business.model_input(scored, features, self.spec)
            probs = model.run(data.numeric, data.categorical)
            logged = business.feature_columns(scored, features) | {"numeric": data.numeric,
                                                                   "categorical": data.categorical}
            self._log("predict", scored, [1] * len(scored), model, probs, logged, model.threshold)
            for i, p in zip(kept, probs.tolist(), strict=True):
                answers[i] = (p, model)
        return answers

    def record_events(self, requests: list[business.PredictRequest]) -> list[tuple[int, str]]:
        """Count events in the online state without scoring them; (index, why) of each one refused."""
        if not catalog.served_entities(self.spec):
            return []
        _, refused = self._feature_lookup().fetch(requests)
        return [(i, str(why)) for i, why in enumerate(refused) if why is not None]

    async def shutdown_state(self) -> None:
        if self._lookup is not None:
            self._lookup.online.state.close()
