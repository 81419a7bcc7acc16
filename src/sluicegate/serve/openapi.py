"""The OpenAPI document of the server (the app is raw ASGI, so it is written out here)."""

from __future__ import annotations

from sluicegate.runtime import INPUT_NAMES, OUTPUT_NAME
from sluicegate.serve.predict import request_schema
from sluicegate.spec import DatasetSpec

ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    text = {400: "Malformed or invalid request", 401: "Missing or wrong API key", 404: "Unknown model or version",
            413: "Body too large", 422: "Request fails validation", 503: "Not ready or a dependency is down"}
    return {str(c): _json(ERROR, text[c]) for c in codes}


def document(models: list[tuple[DatasetSpec, str]], secured: bool, metrics_secured: bool = False) -> dict:
    """The document of a server serving each (spec, model name); /predict is the first one's."""
    tensor = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "enum": list(INPUT_NAMES)},
            "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
            "datatype": {"type": "string", "enum": ["FP32", "INT64"]},
            "parameters": {"type": "object"},
            "data": {"type": "array"},
        },
        "required": ["name", "shape", "datatype"],
        "additionalProperties": False,
    }
    infer_request = {
        "type": "object",
        "properties": {"id": {"type": "string"}, "parameters": {"type": "object"},
                       "inputs": {"type": "array", "items": tensor, "minItems": 1},
                       "outputs": {"type": "array", "items": {"type": "object", "properties": {
                           "name": {"type": "string", "enum": [OUTPUT_NAME]}, "parameters": {"type": "object"}},
                           "required": ["name"], "additionalProperties": False}}},
        "required": ["inputs"],
        "additionalProperties": False,
    }
    infer_response = {"type": "object", "properties": {
        "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
        "outputs": {"type": "array", "items": {"type": "object"}}}, "required": ["model_name", "outputs"]}
    status = {"type": "object"}
    # Any name but these is a 404.
    names = [name for _, name in models]
    model_param = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": names}}]
    security = [{"bearer": []}, {"apiKey": []}] if secured else []
    auth_errors = (401,) if secured else ()
    metrics_security, metrics_errors = (security, auth_errors) if metrics_secured else ([], ())
    doc = {
        "openapi": "3.0.3",
        "info": {"title": "Sluicegate model server", "version": "1",
                 "description": f"Serves {', '.join(f'{n}@champion' for n in names)}: "
                                f"Open Inference Protocol v2 and /predict."},
        "paths": {
            "/v2": {"get": {"summary": "Server metadata", "responses": {"200": _json(status, "Metadata")}}},
            "/v2/health/live": {"get": {"summary": "Liveness", "responses": {"200": _json(status, "Live")}}},
            "/v2/health/ready": {"get": {"summary": "Readiness", "responses": {
                "200": _json(status, "Ready"), **_errors(503)}}},
            "/v2/models/{name}": {"get": {"summary": "Model metadata", "parameters": model_param, "responses": {
                "200": _json(status, "Metadata"), **_errors(404, 503)}}},
            "/v2/models/{name}/ready": {"get": {"summary": "Model readiness", "parameters": model_param,
                                                "responses": {"200": _json(status, "Ready"), **_errors(404, 503)}}},
            "/v2/models/{name}/infer": {"post": {
                "summary": "Inference on tensors (v2 protocol, JSON or binary tensor extension)",
                "parameters": model_param, "security": security,
                "requestBody": {"required": True, "content": {"application/json": {"schema": infer_request}}},
                "responses": {"200": _json(infer_response, "Probabilities"),
                              **_errors(400, *auth_errors, 404, 413, 503)}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": metrics_security, "responses": {
                "200": {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
                **_errors(*metrics_errors)}}},
        },
        "components": {"securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}},
    }
    predict_errors = _errors(400, *auth_errors, 413, 422, 503)
    first_spec, first_name = models[0]
    doc["paths"]["/predict"] = _predict_path(first_spec, first_name, security, predict_errors)
    if len(models) > 1:
        for spec, name in models:
            doc["paths"][f"/predict/{name}"] = _predict_path(spec, name, security, predict_errors)
    return doc


def _predict_path(spec: DatasetSpec, model_name: str, security: list, errors: dict) -> dict:
    response = {"type": "object", "properties": {
        "id": {"anyOf": [{"type": "string"}, {"type": "integer"}], "nullable": True},
        "probability": {"type": "number", "description": f"probability of {spec.predicts!r}"},
        "positive": {"type": "boolean", "description": f"probability >= threshold: predicted "
                                                       f"{spec.label} = {spec.table.positive!r}"},
        "threshold": {"type": "number"}, "model_name": {"type": "string", "enum": [model_name]},
        "model_version": {"type": "string"}}, "required": ["probability", "positive", "model_version"]}
    return {"post": {
        "summary": f"{model_name}: probability and decision for one row: {spec.predicts} (entity features from Feast)",
        "security": security,
        "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema(spec)}}},
        "responses": {"200": _json(response, "Decision"), **errors}}}
