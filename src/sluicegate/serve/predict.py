"""`/predict`: a business request -> its entities' aggregates as of its time, from the online state
(`features.online`), which then counts it -> the shared model-input builder.

The request schema is the spec's raw columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from sluicegate.features.inputs import build_model_input, python_features
from sluicegate.features.online import OnlineFeatures, OutsideState
from sluicegate.runtime import ModelInput
from sluicegate.serve.errors import BadRequest, Unavailable
from sluicegate.spec import DatasetSpec

MAX_ID_LENGTH = 128
# Timestamps a pandas column can hold; outside them the feature builder would fail with a 500.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2262, 4, 11, tzinfo=UTC)


@dataclass(slots=True)
class PredictRequest:
    fields: dict  # the spec's raw columns, validated, timestamp as an aware datetime
    id: str | int | None = None  # the row id, echoed back
    received: float = 0.0  # perf_counter() when the server read the request; set by the server
    contract: str | None = None  # the model-spec hash it was read on; set by the server


def request_schema(spec: DatasetSpec) -> dict:
    """JSON schema of a /predict body, derived from the dataset spec (served in the OpenAPI document)."""
    props: dict[str, dict] = {}
    if spec.id:
        props[spec.id] = {"anyOf": [{"type": "string", "maxLength": MAX_ID_LENGTH}, {"type": "integer"}],
                          "description": "optional, echoed back"}
    if spec.timestamp:
        props[spec.timestamp] = {"type": "string", "format": "date-time",
                                 "description": "ISO 8601, 1970-01-01 to 2262-04-11; default: now (UTC)"}
    for name in _business_columns(spec):
        props[name] = _column_schema(spec.columns[name])
    return {"type": "object", "properties": props, "required": _business_columns(spec),
            "additionalProperties": False}


def _column_schema(col) -> dict:
    if col.categories is not None:
        schema = {"enum": list(col.categories)}
    elif col.dtype == "int64":
        schema = {"type": "integer", "minimum": int(col.min) if col.min is not None else -(2**63),
                  "maximum": int(col.max) if col.max is not None else 2**63 - 1}
    elif col.dtype == "bool":
        schema = {"type": "boolean"}
    elif col.dtype == "string":
        schema = {"type": "string"}
    else:
        schema = {"type": "number", **({"minimum": col.min} if col.min is not None else {}),
                  **({"maximum": col.max} if col.max is not None else {})}
    return {**schema, "nullable": True} if col.may_be_null else schema


def _business_columns(spec: DatasetSpec) -> list[str]:
    """Columns a caller must send: every raw column the model reads, but the timestamp (default: now)."""
    return [c for c in spec.request_columns if c != spec.timestamp]


def parse_predict(body, spec: DatasetSpec, now: datetime | None = None) -> PredictRequest:
    """Validate a decoded JSON body against the spec; every problem is listed, not just the first."""
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object with the row's fields", 422)
    errors: list[dict] = []
    optional = [n for n in (spec.id, spec.timestamp) if n]
    for name in sorted(body.keys() - {*optional, *_business_columns(spec)}):
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
    row_id = body.get(spec.id) if spec.id else None
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, str | int)
                               or len(str(row_id)) > MAX_ID_LENGTH):
        errors.append({"field": spec.id, "error": f"must be a string or integer of at most {MAX_ID_LENGTH} "
                                                  "characters"})
    if spec.timestamp:
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
    return PredictRequest(out, row_id)


def _check(value, col) -> tuple[str | None, object]:
    if value is None:
        return (None, None) if col.may_be_null else ("must not be null", None)
    if col.categories is not None:
        # bool is an int in Python: True must not pass for the category 1
        if value not in col.categories or isinstance(value, bool) != (col.dtype == "bool"):
            return f"must be one of {list(col.categories)}, got {value!r}", None
        return None, value
    if col.dtype == "bool":
        return (None, value) if isinstance(value, bool) else (f"must be true or false, got {value!r}", None)
    if col.dtype == "string":
        return (None, value) if isinstance(value, str) else (f"must be a string, got {value!r}", None)
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
    """A micro-batch's aggregates from the online state, each request then counted in it (once per id).

    A request the state cannot score exactly (older than what it keeps for its entity) is refused with
    a 422 saying so; a state that cannot answer (its file locked past the timeout, Redis down) is a 503
    for the whole batch, and nothing of the batch is counted."""

    def __init__(self, online: OnlineFeatures):
        self.online = online

    def fetch(self, requests: list[PredictRequest]) -> tuple[dict[str, np.ndarray], list[BadRequest | None]]:
        events, refused = [], [None] * len(requests)
        for i, request in enumerate(requests):
            try:
                events.append(self.online.event(request.fields, request.id))
            except OutsideState as exc:
                refused[i] = BadRequest(f"invalid request: {exc}", 422)
        try:
            found, outside = self.online.score(events)
        except Exception as exc:  # any state failure (file lock, disk, Redis) means: not now
            raise Unavailable(f"online feature store unavailable: {type(exc).__name__}: {exc}") from exc
        kept = [i for i, r in enumerate(refused) if r is None]
        for i, why in zip(kept, outside, strict=True):
            if why is not None:
                refused[i] = BadRequest(f"invalid request: {why}", 422)
        out = {name: np.full(len(requests), np.nan) for name in found}
        for name, values in found.items():
            out[name][kept] = values
        return out, refused


def model_input(requests: list[PredictRequest], found: dict[str, np.ndarray], spec: DatasetSpec) -> ModelInput:
    """The batch's raw columns plus its features -> the same builder training used."""
    columns = request_columns(requests, spec)
    columns.update(found)
    if spec.features.python:
        extra = python_features(pd.DataFrame(columns), spec)
        columns.update({name: extra[name].to_numpy() for name in extra.columns})
    return build_model_input(columns, spec)


def request_columns(requests: list[PredictRequest], spec: DatasetSpec) -> dict:
    columns: dict = {name: [r.fields[name] for r in requests] for name in _business_columns(spec)}
    if spec.timestamp:  # aware datetimes -> naive UTC datetime64, which the builder reads as UTC
        columns[spec.timestamp] = np.array([r.fields[spec.timestamp].astimezone(UTC).replace(tzinfo=None)
                                            for r in requests], dtype="datetime64[us]")
    return columns


def feature_columns(requests: list[PredictRequest], found: dict[str, np.ndarray]) -> dict[str, list | np.ndarray]:
    """What the prediction log keeps for a /predict batch: the requests' fields and their online features."""
    columns: dict[str, list | np.ndarray] = {
        name: [v.isoformat() if isinstance(v, datetime) else v for v in (r.fields[name] for r in requests)]
        for name in requests[0].fields}
    columns.update(found)  # one value per row, NaN where Feast had nothing
    return columns
