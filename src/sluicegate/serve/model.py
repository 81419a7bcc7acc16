"""The champion in memory: checked by `ship.loader`, hot-swapped when @champion moves."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from mlflow import MlflowClient

from sluicegate import runtime
from sluicegate.config import Settings
from sluicegate.hardware import hardware, serving_providers
from sluicegate.ship import registry
from sluicegate.ship.loader import (
    FetchFailed,
    LoadedModel,
    ModelRejected,
    fetch_onnx,
    fetch_spec,
    load_from_bytes,
    registry_client,
)
from sluicegate.spec import DatasetSpec
from sluicegate.train.identity import spec_hash

log = logging.getLogger("sluicegate.serve")


class ModelManager:
    """Holds the serving model; `refresh` swaps in a new champion only once it has passed every check.

    Readers take `manager.current` once per batch, so a swap never mixes models
    within a batch and in-flight batches finish on the model they started with.

    A version the checks refuse is remembered (by version and sha256) and not fetched again; a
    version whose artifact could not be fetched (`FetchFailed`: MLflow, the artifact store or the
    network down) is not: `fetch_error` says why, and the next `refresh` tries it again.

    Each version is served on the inputs of its own spec: the server's, when the version's `spec_hash`
    tag names it (or predates the tag), else the spec its evidence recorded (`loader.fetch_spec`), so a
    champion trained after a spec change, and a rollback across one, bring their own input contract.

    Models run on the target's execution provider (`hardware`), never on another: a target whose
    provider is not installed stops the server at start, and a session onnxruntime started on another
    provider is not swapped in (nor remembered against the version: the machine is at fault, not it).
    """

    def __init__(self, settings: Settings, threads: int, providers: list[str],
                 widths: Callable[[DatasetSpec], tuple[int, int]],
                 on_loaded: Callable[[LoadedModel], None] | None = None,
                 on_rejected: Callable[[str, str], None] | None = None):
        self.settings = settings
        self.threads = threads
        self.hardware = hardware(settings)
        self.override = list(providers)  # SLUICEGATE_SERVE_PROVIDERS: empty, or the target's provider first
        self.providers = serving_providers(self.hardware, "fp32", self.override)
        self.widths = widths  # a spec's tensor widths (`features.inputs.tensor_widths`)
        self._own_hash = spec_hash(settings.spec)
        self.current: LoadedModel | None = None
        self.last_error: str | None = None
        self.fetch_error: str | None = None  # the champion's artifact could not be fetched; retried next poll
        self._rejected: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._on_loaded = on_loaded
        self._on_rejected = on_rejected
        self._client: MlflowClient | None = None

    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = registry_client(self.settings)
        return self._client

    def refresh(self) -> bool:
        """Load the champion if it moved; True when a new model now serves."""
        with self._lock:  # one load at a time, even if a poll overlaps a manual refresh
            name = self.settings.model_name
            version = registry.version_by_alias(self.client(), name, registry.CHAMPION)
            self.fetch_error = None  # set again below if this champion's artifact cannot be fetched
            if version is None:
                return False
            number = str(version.version)
            key = (number, version.tags.get("sha256", ""))
            if (self.current is not None and self.current.version == number) or key in self._rejected:
                return False
            try:
                if not number.isdigit():  # it names folders (model repository) and metrics
                    raise ModelRejected(f"{name}: version {number!r} is not a number")
                spec = self._spec_of(version)
                data = fetch_onnx(self.client(), version)
                variant = version.tags.get("variant", "")
                model = load_from_bytes(name, number, data, version.tags.get("sha256"),
                                        version.tags.get("threshold"), variant, self.threads,
                                        serving_providers(self.hardware, variant, self.override), self.widths(spec))
                model.spec = spec
                runtime.check_session(model.session, self.hardware.provider)
            except runtime.ProviderUnavailable as exc:  # this machine's fault: not held against the version
                self.last_error = str(exc)
                log.error("champion %s v%s not served on %s: %s", name, number, self.hardware.label(), exc)
                return False
            except FetchFailed as exc:  # nothing known against the model: not rejected, tried again next poll
                self.last_error = self.fetch_error = str(exc)
                log.error("champion %s v%s not fetched, still serving %s; trying again at the next poll: %s",
                          name, number, f"v{self.current.version}" if self.current else "nothing", exc)
                return False
            except ModelRejected as exc:
                self._rejected.add(key)
                self.last_error = str(exc)
                log.error("champion %s v%s rejected, still serving %s: %s", name, number,
                          f"v{self.current.version}" if self.current else "nothing", exc)
                if self._on_rejected:
                    self._on_rejected(number, str(exc))
                return False
            previous = self.current
            self.current = model
            self.last_error = None
            log.warning("now serving %s v%s (%s) on %s%s", name, model.version, model.variant,
                        self.hardware.label(), f", was v{previous.version}" if previous else "")
            if self._on_loaded:
                self._on_loaded(model)
            return True

    def _spec_of(self, version) -> DatasetSpec:
        tag = version.tags.get("spec_hash")
        if tag is None or tag == self._own_hash:
            return self.settings.spec
        spec = fetch_spec(self.client(), version)
        if spec_hash(spec) != tag:
            raise ModelRejected(f"{version.name} v{version.version}: its recorded spec hashes to {spec_hash(spec)}, "
                                f"its tag says {tag}")
        log.warning("%s v%s reads the inputs of its own spec %s (the server was started on %s)",
                    version.name, version.version, tag, self._own_hash)
        return spec
