"""`/predict`: a business request -> online features from Feast -> the shared model-input builder.

Feast's online values for an entity are its state just before its last
materialized transaction, so they lag the request by one transaction; the
request's own fields (amount, time, channel, ...) are always current.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from sluicegate.features import catalog as features
from sluicegate.features.inputs import ModelInput, build_model_input
from sluicegate.serve.errors import BadRequest, Unavailable
from sluicegate.spec import DatasetSpec

if TYPE_CHECKING:  # Feast is imported only by the first /predict, through features.store
    import feast

MAX_ID_LENGTH = 128
# Timestamps a pandas column can hold; outside them the feature builder would fail with a 500.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2262, 4, 11, tzinfo=UTC)


@dataclass(slots=True)
class PredictRequest:
    fields: dict  # the spec's raw columns, validated, timestamp as an aware datetime
    id: str | None = None  # the transaction id, echoed back
    received: float = 0.0  # perf_counter() when the server read the request; set by the server


def request_schema(spec: DatasetSpec) -> dict:
    """JSON schema of a /predict body, derived from the dataset spec (served in the OpenAPI document)."""
    props: dict[str, dict] = {
        spec.id: {"type": "string", "maxLength": MAX_ID_LENGTH, "description": "optional, echoed back"},
        spec.timestamp: {"type": "string", "format": "date-time",
                         "description": "ISO 8601, 1970-01-01 to 2262-04-11; default: now (UTC)"},
    }
    required = []
    for name in _business_columns(spec):
        col = spec.columns[name]
        if col.categories:
            props[name] = {"type": "string", "enum": list(col.categories)}
        elif col.dtype == "int64":
            props[name] = {"type": "integer", "minimum": int(col.min or 0), "maximum": 2**63 - 1}
        else:
            props[name] = {"type": "number"}
            if col.min is not None:
                props[name]["minimum"] = col.min
            if col.max is not None:
                props[name]["maximum"] = col.max
        required.append(name)
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def _business_columns(spec: DatasetSpec) -> list[str]:
    """Columns a caller must send: everything but id, timestamp and label."""
    return [c for c in spec.columns if c not in (spec.id, spec.timestamp, spec.label)]


def parse_predict(body, spec: DatasetSpec, now: datetime | None = None) -> PredictRequest:
    """Validate a decoded JSON body against the spec; every problem is listed, not just the first."""
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object with the transaction's fields", 422)
    errors: list[dict] = []
    allowed = {spec.id, spec.timestamp, *_business_columns(spec)}
    for name in sorted(body.keys() - allowed):
        errors.append({"field": name, "error": "unknown field"})
    out: dict = {}
    for name in _business_columns(spec):
        if name not in body:
            errors.append({"field": name, "error": "required"})
            continue
        problem, value = _check(body[name], spec.columns[name])
        if problem:
            errors.append({"field": name, "error": problem})
        out[name] = value
    tx_id = body.get(spec.id)
    if tx_id is not None and (not isinstance(tx_id, str) or len(tx_id) > MAX_ID_LENGTH):
        errors.append({"field": spec.id, "error": f"must be a string of at most {MAX_ID_LENGTH} characters"})
    out[spec.id] = tx_id
    when = body.get(spec.timestamp)
    if when is None:
        out[spec.timestamp] = now or datetime.now(UTC)
    else:
        problem, out[spec.timestamp] = _timestamp(when)
        if problem:
            errors.append({"field": spec.timestamp, "error": problem})
    if errors:
        message = "; ".join(f"{e['field']}: {e['error']}" for e in errors)
        raise BadRequest(f"invalid request: {message}", 422, errors)
    return PredictRequest(out, tx_id)


def _check(value, col) -> tuple[str | None, object]:
    if col.categories:
        if not isinstance(value, str) or value not in col.categories:
            return f"must be one of {list(col.categories)}, got {value!r}", None
        return None, value
    if col.dtype == "int64":
        if not isinstance(value, int) or isinstance(value, bool) or not -(2**63) <= value < 2**63:
            return f"must be a 64-bit integer, got {value!r}", None
    elif not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        return f"must be a finite number, got {value!r}", None
    if col.min is not None and value < col.min:
        return f"must be >= {col.min:g}, got {value!r}", None
    if col.max is not None and value > col.max:
        return f"must be <= {col.max:g}, got {value!r}", None
    # JSON's 42 and 42.0 are one amount: one type keeps the prediction log's columns consistent.
    return None, value if col.dtype == "int64" else float(value)


def _timestamp(value) -> tuple[str | None, datetime | None]:
    if not isinstance(value, str):
        return f"must be an ISO 8601 string, got {value!r}", None
    try:
        when = datetime.fromisoformat(value)
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        inside = EARLIEST <= when <= LATEST  # pandas holds nanoseconds since 1970 in 64 bits
    except (ValueError, OverflowError):
        return f"is not an ISO 8601 timestamp: {value!r}", None
    if not inside:
        return f"must lie between {EARLIEST:%Y-%m-%d} and {LATEST:%Y-%m-%d}, got {value!r}", None
    return None, when


class FeatureLookup:
    """Online features for many requests in one Feast call.

    The store, the feature service and the join keys are resolved once;
    `get_online_features(...).to_dict()` is the fast path of Feast's SDK
    (`to_df()` on one row costs about 20x more here).
    """

    def __init__(self, store: feast.FeatureStore, spec: DatasetSpec):
        self.store = store
        self.spec = spec
        self.service = store.get_feature_service(features.FEATURE_SERVICE)
        self.customer_key = store.get_entity(features.CUSTOMER_ENTITY).join_key
        self.merchant_key = store.get_entity(features.MERCHANT_ENTITY).join_key

    def fetch(self, customer_ids: list[int], merchant_ids: list[int]) -> dict[str, np.ndarray]:
        rows = {self.customer_key: customer_ids, self.merchant_key: merchant_ids}
        try:
            found = self.store.get_online_features(features=self.service, entity_rows=rows).to_dict()
        except Exception as exc:  # any store failure (file, network, Redis) means: not now
            raise Unavailable(f"online feature store unavailable: {type(exc).__name__}: {exc}") from exc
        # Feast answers None for an entity it has never seen; the input builder's defaults take NaN.
        return {name: np.array([np.nan if v is None else v for v in found[name]], dtype=np.float64)
                for name in features.FEATURE_NAMES}


def model_input(requests: list[PredictRequest], found: dict[str, np.ndarray], spec: DatasetSpec) -> ModelInput:
    """The batch's raw columns plus its features -> the same builder training used."""
    columns: dict = {name: [r.fields[name] for r in requests] for name in (spec.amount, *spec.categorical_features)}
    # Aware datetimes -> naive UTC datetime64, which the builder reads as UTC.
    columns[spec.timestamp] = np.array([r.fields[spec.timestamp].astimezone(UTC).replace(tzinfo=None)
                                        for r in requests], dtype="datetime64[us]")
    return build_model_input({**columns, **found}, spec)


def feature_columns(requests: list[PredictRequest], found: dict[str, np.ndarray]) -> dict[str, list | np.ndarray]:
    """What the prediction log keeps for a /predict batch: the requests' fields and their online features."""
    columns: dict[str, list | np.ndarray] = {
        name: [v.isoformat() if isinstance(v, datetime) else v for v in (r.fields[name] for r in requests)]
        for name in requests[0].fields}
    columns.update(found)  # one value per row, NaN where Feast had nothing
    return columns
