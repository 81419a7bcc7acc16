"""Schemathesis against the running server's own OpenAPI document: valid and malformed requests on
every operation, with and without the API key. No request may get a 5xx, and every malformed one
must get a 4xx; responses must match the document."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration import test_serving as served
from tests.integration.test_serving import world  # noqa: F401 (fixture: a trained champion, features online)

MIN_CASES = 1000
CHECKS = ["not_a_server_error", "negative_data_rejection", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "ignored_auth", "unsupported_method"]


@pytest.fixture(scope="module")
def server(world):  # noqa: F811
    running = served.Running(world["settings"], metrics_auth=True, log_predictions=False)
    yield running
    running.stop()


def test_schemathesis_finds_no_5xx_and_every_malformed_request_gets_a_4xx(server, tmp_path):
    report = tmp_path / "report.json"
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{server.url}/openapi.json",
           "--checks", ",".join(CHECKS), "--mode", "all", "--max-examples", "200", "--seed", "7",
           "--phases", "examples,coverage,fuzzing", "--workers", "1", "--request-timeout", "30",
           "--suppress-health-check", "too_slow,filter_too_much",
           "-H", f"Authorization: Bearer {served.KEY}", "--report", "json", "--report-json-path", str(report)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    summary = json.loads(report.read_text())
    cases = summary["test_cases"]
    assert summary["complete"] and summary["operations"]["tested"] == summary["operations"]["total"] == 8
    assert cases["generated"] >= MIN_CASES, cases
    assert cases["with_failures"] == 0 and cases["errored"] == 0 and not summary["failures"], summary["failures"]
    # Coverage (boundary and wrong-type values for every field) ran beside fuzzing, not instead of it.
    phases = summary["phases"]
    assert phases["coverage"]["status"] == phases["fuzzing"]["status"] == "success", phases
    with httpx.Client(base_url=server.url) as http:  # and the server is still healthy
        assert http.get("/v2/health/ready").status_code == 200


def test_a_timestamp_pandas_cannot_hold_is_a_422_not_a_500(server, world):  # noqa: F811
    """Found by this fuzzing: year 1247 reached the feature builder and failed there with a 500."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for when in ("1247-03-12T15:17:52Z", "9999-12-31T23:59:59-23:00", "2300-01-01T00:00:00"):
            body = {**served._business(world["frame"].iloc[0]), "event_timestamp": when}
            answer = http.post("/predict", json=body, headers=served.AUTH)
            assert answer.status_code == 422 and "event_timestamp" in answer.json()["error"], answer.text


@pytest.mark.parametrize("name", [{}, {"numeric": 1}, ["numeric"], [], 7, None])
def test_a_tensor_name_that_is_not_a_string_is_a_400_not_a_500(server, name):
    """Found by schemathesis's coverage phase: `{"name": {}}` reached a dict lookup and answered 500."""
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for inputs in ([{"name": name, "shape": [1, 1], "datatype": "FP32", "data": [0.5]}], [{"name": name}]):
            answer = http.post(f"/v2/models/{served.NAME}/infer", json={"inputs": inputs}, headers=served.AUTH)
            assert answer.status_code == 400 and "'name' must be a string" in answer.json()["error"], answer.text
