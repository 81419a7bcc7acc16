"""One served model: a spec's champion with its input contract, batchers, prediction log and
feature lookup. The server holds one per `--spec`; nothing here speaks HTTP.

The input contract (request schema, tensor widths, logged columns, online state) is the serving
champion's own spec, which is the server's unless the champion was trained after a spec change: the
contract moves with the champion, and back with a rollback."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np

from sluicegate.config import Settings
from sluicegate.features import catalog
from sluicegate.features.inputs import cardinalities, logged_inputs, numeric_inputs, tensor_widths
from sluicegate.features.online import EventState, OnlineFeatures, open_state, state_key
from sluicegate.serve import predict as business
from sluicegate.serve import privacy, v2
from sluicegate.serve.batcher import MicroBatcher
from sluicegate.serve.errors import Unavailable
from sluicegate.serve.metrics import Metrics
from sluicegate.serve.model import LoadedModel, ModelManager
from sluicegate.serve.predlog import PredictionLog, Record
from sluicegate.serve.settings import ServeSettings
from sluicegate.ship import model_repository, registry
from sluicegate.spec import DatasetSpec
from sluicegate.train.identity import spec_hash

log = logging.getLogger("sluicegate.serve")


@dataclass(frozen=True)
class Contract:
    """What one spec makes of a request: its key (the model-spec hash), the /predict schema's spec, the
    v2 tensors' column names, widths and category limits, and the prediction log's column names."""

    key: str
    spec: DatasetSpec
    numeric_names: list[str]
    widths: tuple[int, int]
    code_limits: np.ndarray
    logged: dict[str, list[str]]

    @classmethod
    def of(cls, spec: DatasetSpec) -> Contract:
        return cls(spec_hash(spec), spec, numeric_inputs(spec), tensor_widths(spec),
                   np.asarray(cardinalities(spec), dtype=np.uint64), logged_inputs(spec))


class ContractChanged(Unavailable):
    """A request read on one champion's contract, answered after a champion with another took over."""


class ServedModel:
    """A spec's `model_name@champion`. Everything heavy starts in `startup`, nothing at construction."""

    def __init__(self, settings: Settings, serve: ServeSettings, metrics: Metrics):
        self.settings = settings
        self.serve = serve
        self.metrics = metrics
        self.name = registry.check_model_name(settings.model_name)
        self.own = Contract.of(settings.spec)  # the server's spec: the contract until a champion loads
        self._contracts = {self.own.key: self.own}
        self._by_spec: dict[int, tuple[DatasetSpec, Contract]] = {}
        self.manager = ModelManager(settings, serve.threads, serve.providers, tensor_widths,
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
        self._lookups: dict[str, business.FeatureLookup] = {}  # by contract key
        self._states: dict[str, EventState] = {}  # by online-state key (`features.online.state_key`)

    # ------------------------------------------------------------------ lifecycle

    async def startup(self) -> None:
        if self.serve.log_predictions:
            self.predlog = PredictionLog(
                self.settings.paths.predictions, self.serve.log_queue_size, self.serve.log_flush_s,
                expand=self.own.logged, redact=privacy.log_redactor(self.settings.spec, self.settings.paths),
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
                                               model.version, model.onnx_bytes, self.contract_of(model).widths)
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

    def contract_of(self, model: LoadedModel | None) -> Contract:
        spec = model.spec if model is not None and model.spec is not None else self.own.spec
        # Asked a few times a micro-batch: hashing the spec costs ~90 us, a lookup by the object nothing.
        seen = self._by_spec.get(id(spec))
        if seen is None or seen[0] is not spec:
            key = spec_hash(spec)
            if key not in self._contracts:
                self._contracts[key] = Contract.of(spec)
            seen = self._by_spec[id(spec)] = (spec, self._contracts[key])  # holding the spec keeps its id
        return seen[1]

    def contract(self) -> Contract:
        """The serving champion's contract (the server's own before one loads)."""
        return self.contract_of(self.manager.current)

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
        widths = self.contract_of(model).widths
        fits = [(r.numeric.shape[1], r.categorical.shape[1]) == widths for r in requests]
        if not all(fits):  # read on the previous champion's contract: those retry, the rest are answered
            return self._answer_v2(requests, fits, model)
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

    def _answer_v2(self, requests: list, fits: list[bool], model: LoadedModel) -> list:
        fresh = [r for r, ok in zip(requests, fits, strict=True) if ok]
        answered = iter(self._run_v2(fresh) if fresh else [])
        why = ContractChanged(f"{model.name} v{model.version} reads inputs of widths {self.contract_of(model).widths} "
                              "since this request was read; send it again")
        return [next(answered) if ok else why for ok in fits]

    def _log(self, endpoint: str, requests: list, rows: list[int], model: LoadedModel, probs: np.ndarray,
             features: dict, threshold: float | None = None) -> None:
        """One prediction-log record for the whole model call."""
        if self.predlog is None:
            return
        now = time.perf_counter()
        self.predlog.put(Record(endpoint, time.time(), model.name, model.version, [r.id for r in requests],
                                [(now - r.received) * 1000.0 for r in requests], rows, probs, features, threshold,
                                self.contract_of(model).logged))

    def _feature_lookup(self, contract: Contract) -> business.FeatureLookup:
        """The contract's aggregates over the online state of its aggregated columns (shared by every
        contract that aggregates the same columns), opened on first use; a failed open is retried on the
        next batch."""
        if contract.key not in self._lookups:
            key = state_key(contract.spec)
            if key not in self._states:
                try:
                    self._states[key] = open_state(self.settings, contract.spec, serving=True)
                except Exception as exc:
                    raise Unavailable(f"online feature store unavailable: {type(exc).__name__}: {exc}") from exc
            self._lookups[contract.key] = business.FeatureLookup(OnlineFeatures(contract.spec, self._states[key]))
        return self._lookups[contract.key]

    def _run_predict(self, requests: list[business.PredictRequest]) -> list:
        """One online-state transaction, one input build and one model call for the whole batch; a request
        the state refused gets its error."""
        model = self.serving()
        contract = self.contract_of(model)
        stale = ContractChanged(f"{model.name} v{model.version} reads another request schema since this "
                                "request was read; send it again")
        refused: list = [None if r.contract in (None, contract.key) else stale for r in requests]
        found: dict = {}
        current = [i for i, why in enumerate(refused) if why is None]
        if current and catalog.served_entities(contract.spec):
            found, more = self._feature_lookup(contract).fetch([requests[i] for i in current])
            for i, why in zip(current, more, strict=True):
                refused[i] = why
            found = _spread(found, current, len(requests))
        kept = [i for i, why in enumerate(refused) if why is None]
        answers: list = list(refused)
        if kept:
            scored = [requests[i] for i in kept]
            features = {name: values[kept] for name, values in found.items()}
            data = business.model_input(scored, features, contract.spec)
            probs = model.run(data.numeric, data.categorical)
            logged = business.feature_columns(scored, features) | {"numeric": data.numeric,
                                                                   "categorical": data.categorical}
            self._log("predict", scored, [1] * len(scored), model, probs, logged, model.threshold)
            for i, p in zip(kept, probs.tolist(), strict=True):
                answers[i] = (p, model)
        return answers

    def record_events(self, requests: list[business.PredictRequest]) -> list[tuple[int, str]]:
        """Count events in the online state without scoring them; (index, why) of each one refused."""
        contract = self.contract()
        if not catalog.served_entities(contract.spec):
            return []
        _, refused = self._feature_lookup(contract).fetch(requests)
        return [(i, str(why)) for i, why in enumerate(refused) if why is not None]

    def online_state(self):
        """The serving champion's online state (opened if need be)."""
        return self._feature_lookup(self.contract()).online.state

    async def shutdown_state(self) -> None:
        for state in self._states.values():
            state.close()


def _spread(found: dict[str, np.ndarray], rows: list[int], n: int) -> dict[str, np.ndarray]:
    """Features found for some rows of a batch, as columns over all its rows (NaN elsewhere)."""
    if len(rows) == n:
        return found
    out = {name: np.full(n, np.nan) for name in found}
    for name, values in found.items():
        out[name][rows] = values
    return out
