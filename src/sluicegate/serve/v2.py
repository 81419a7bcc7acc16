"""Open Inference Protocol v2 (KServe / Triton): request parsing, strict validation, responses.

Supports JSON tensors and Triton's binary tensor extension (what
`tritonclient.http` sends by default), so standard clients work unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson

from sluicegate.runtime import INPUT_NAMES, OUTPUT_NAME
from sluicegate.serve.errors import BadRequest

HEADER_LENGTH = "inference-header-content-length"
DTYPES = {INPUT_NAMES[0]: ("FP32", np.dtype(np.float32)), INPUT_NAMES[1]: ("INT64", np.dtype(np.int64))}
REQUEST_FIELDS = {"id", "parameters", "inputs", "outputs"}
INPUT_FIELDS = {"name", "shape", "datatype", "parameters", "data"}
OUTPUT_FIELDS = {"name", "parameters"}


@dataclass(slots=True)
class InferRequest:
    numeric: np.ndarray
    categorical: np.ndarray
    id: str | None
    binary_output: bool
    received: float = 0.0  # perf_counter() when the server read the request; set by the server

    @property
    def rows(self) -> int:
        return len(self.numeric)


def parse_infer(body: bytes, header_length: str | None, numeric_names: Sequence[str], cardinalities: Sequence[int],
                max_rows: int) -> InferRequest:
    """Body (JSON, or JSON header + binary tensors) -> validated model tensors.

    `cardinalities` bounds each categorical column; a uint64 array saves a conversion per request.
    """
    binary = b""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
        body, binary = body[:n], body[n:]
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"body is not valid JSON: {exc}") from None
    if not isinstance(request, dict):
        raise BadRequest("body must be a JSON object with an 'inputs' list")
    _no_unknown(request, REQUEST_FIELDS, "request")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest("'id' must be a string")
    parameters = _parameters(request.get("parameters"), "request")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest(f"'inputs' must be a non-empty list of the tensors {list(INPUT_NAMES)}")
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for item in inputs:
        name, array, used = _tensor(item, binary, offset, numeric_names, cardinalities, max_rows)
        if name in tensors:
            raise BadRequest(f"input {name!r} is given twice")
        tensors[name] = array
        offset += used
    if offset != len(binary):
        raise BadRequest(f"binary data is {len(binary)} bytes but the inputs declare {offset}")
    missing = [n for n in INPUT_NAMES if n not in tensors]
    if missing:
        raise BadRequest(f"missing input tensor(s) {missing}; the model takes {list(INPUT_NAMES)}")
    numeric, categorical = tensors[INPUT_NAMES[0]], tensors[INPUT_NAMES[1]]
    if len(numeric) != len(categorical):
        raise BadRequest(f"inputs disagree on the batch size: {INPUT_NAMES[0]} has {len(numeric)} rows, "
                         f"{INPUT_NAMES[1]} has {len(categorical)}")
    binary_output = _binary_output(request.get("outputs"), parameters)
    return InferRequest(numeric, categorical, request_id, binary_output)


def _no_unknown(obj: dict, allowed: set[str], where: str) -> None:
    unknown = obj.keys() - allowed
    if unknown:
        raise BadRequest(f"unknown field(s) {sorted(unknown)} in {where}; allowed: {sorted(allowed)}")


def _parameters(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"'parameters' of {where} must be an object")
    return value


def _tensor(item, binary: bytes, offset: int, numeric_names: Sequence[str], cardinalities: Sequence[int],
            max_rows: int):
    if not isinstance(item, dict):
        raise BadRequest("each input must be an object with name, shape, datatype and data")
    # Every field's JSON type is checked before its value is used: a name that is an object or a
    # list must be a 400, not an unhashable-key error (schemathesis's coverage phase sends both).
    name = item.get("name")
    if not isinstance(name, str):
        raise BadRequest(f"an input's 'name' must be a string, one of {list(INPUT_NAMES)}; "
                         f"got {_json_type(name)}")
    if name not in DTYPES:
        raise BadRequest(f"unknown input {name!r}; the model takes {list(INPUT_NAMES)}")
    where = f"input {name!r}"
    _no_unknown(item, INPUT_FIELDS, where)
    datatype, dtype = DTYPES[name]
    given = item.get("datatype")
    if not isinstance(given, str):
        raise BadRequest(f"{where} 'datatype' must be the string {datatype!r}, got {_json_type(given)}")
    if given != datatype:
        raise BadRequest(f"{where} must have datatype {datatype}, got {given!r}")
    width = len(numeric_names) if name == INPUT_NAMES[0] else len(cardinalities)
    shape = item.get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or type(shape[0]) is not int or type(shape[1]) is not int:
        raise BadRequest(f"{where} shape must be [rows, {width}], got {shape!r}")
    rows = shape[0]
    if shape[1] != width or not 1 <= rows <= max_rows:
        raise BadRequest(f"{where} shape must be [rows, {width}] with 1 <= rows <= {max_rows}, got {shape}")
    size = rows * width
    binary_size = _parameters(item.get("parameters"), where).get("binary_data_size")
    if binary_size is not None:
        if type(binary_size) is not int:  # not a bool, a float or a string that compares equal
            raise BadRequest(f"{where}: binary_data_size must be an integer, got {_json_type(binary_size)}")
        if "data" in item:
            raise BadRequest(f"{where} has both 'data' and binary_data_size")
        if binary_size != size * dtype.itemsize:
            raise BadRequest(f"{where}: binary_data_size {binary_size} != {size} x {dtype.itemsize} bytes")
        if offset + binary_size > len(binary):
            raise BadRequest(f"{where}: binary data ends after {len(binary)} bytes, needs {offset + binary_size}")
        array = np.frombuffer(binary, dtype=dtype.newbyteorder("<"), count=size, offset=offset)
        used = binary_size
    else:
        array = _json_data(item.get("data"), where, dtype, size)
        used = 0
    array = array.reshape(rows, width)
    _check_range(name, array, where, numeric_names, cardinalities)
    return name, array, used


def _json_type(value) -> str:
    """How a refused value is named in a message: its JSON type, and the value when it is short."""
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{kind} {shown}" if len(shown) <= 40 else kind


def _json_data(data, where: str, dtype: np.dtype, size: int) -> np.ndarray:
    if not isinstance(data, list):
        raise BadRequest(f"{where} needs 'data' (a flat or nested list) or binary data")
    try:
        raw = np.asarray(data)
    except ValueError:
        raise BadRequest(f"{where} data is ragged; rows must all have the same length") from None
    # Strict types: no strings or booleans, and no silent float -> int truncation.
    allowed = "iu" if dtype.kind == "i" else "iuf"
    if raw.dtype.kind not in allowed:
        want = "integers" if dtype.kind == "i" else "numbers"
        raise BadRequest(f"{where} data must be {want}, got {raw.dtype.name} values")
    if raw.size != size:
        raise BadRequest(f"{where} has {raw.size} values, its shape needs {size}")
    if dtype.kind == "i":  # int64 from JSON's integers cannot overflow; a uint64 wraps negative, caught later
        return raw.astype(dtype, copy=False)
    with np.errstate(over="ignore"):  # overflow becomes inf, which the range check reports
        return raw.astype(dtype, copy=False)


def _check_range(name: str, array: np.ndarray, where: str, numeric_names: Sequence[str],
                 cardinalities: Sequence[int]) -> None:
    # Few small-array numpy calls on the clean path (each costs about a microsecond here);
    # the search for the offending cell runs only for a request that is refused.
    if name == INPUT_NAMES[0]:
        if not np.logical_and.reduce(np.isfinite(array), axis=None):
            bad = np.argwhere(~np.isfinite(array))[0]
            raise BadRequest(f"{where} must be finite float32; row {bad[0]} column {numeric_names[bad[1]]} "
                             f"is {array[bad[0], bad[1]]}")
        return
    high = np.asarray(cardinalities, dtype=np.uint64)  # no copy when the server passes uint64 already
    # Viewed as unsigned, a negative code is above every limit: one comparison checks both ends.
    if np.logical_or.reduce(np.greater_equal(array.view(np.uint64), high), axis=None):
        bad = (array < 0) | (array >= high.astype(np.int64))
        row, col = np.argwhere(bad)[0]
        raise BadRequest(f"{where} row {row} column {col} is {array[row, col]}; "
                         f"codes must lie in [0, {high[col] - 1}] (0 = unknown)")


def _binary_output(outputs, parameters: dict) -> bool:
    binary = bool(parameters.get("binary_data_output", False))
    if outputs is None:
        return binary
    if not isinstance(outputs, list):
        raise BadRequest("'outputs' must be a list")
    for out in outputs:
        if not isinstance(out, dict) or out.get("name") != OUTPUT_NAME:
            raise BadRequest(f"unknown output {out.get('name') if isinstance(out, dict) else out!r}; "
                             f"the model has {OUTPUT_NAME!r}")
        _no_unknown(out, OUTPUT_FIELDS, f"output {OUTPUT_NAME!r}")
        binary = bool(_parameters(out.get("parameters"), "output").get("binary_data", binary))
    return binary


def infer_response(model_name: str, version: str, request_id: str | None, probs: np.ndarray,
                   binary: bool) -> tuple[bytes, dict[str, str]]:
    """Body and extra headers of a v2 inference response."""
    output = {"name": OUTPUT_NAME, "datatype": "FP32", "shape": [len(probs)]}
    head = {"model_name": model_name, "model_version": version, "outputs": [output]}
    if request_id is not None:
        head["id"] = request_id
    if not binary:
        output["data"] = probs
        return orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY), {}
    raw = np.ascontiguousarray(probs, dtype="<f4").tobytes()
    output["parameters"] = {"binary_data_size": len(raw)}
    header = orjson.dumps(head)
    return header + raw, {HEADER_LENGTH: str(len(header))}


def model_metadata(model_name: str, version: str | None, numeric_width: int, categorical_width: int) -> dict:
    return {
        "name": model_name,
        "versions": [version] if version else [],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": INPUT_NAMES[0], "datatype": "FP32", "shape": [-1, numeric_width]},
            {"name": INPUT_NAMES[1], "datatype": "INT64", "shape": [-1, categorical_width]},
        ],
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1]}],
    }
