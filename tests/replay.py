"""Real traffic for tests: a `sluicegate serve` subprocess and rows sent to it as a caller would."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import pandas as pd
import pytest

from sluicegate.spec import load_spec


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def model_server(env: dict):
    """A real `sluicegate serve` in a subprocess with this environment; its URL once ready."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "sluicegate", "serve", "--port", str(port)], env=env,
                              cwd=env.get("WORK"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("the model server did not become ready")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)
    time.sleep(0.5)


def predict_rows(url: str, rows: pd.DataFrame) -> None:
    """Each row through /predict, as a caller sends it: the spec's request columns and the row id."""
    spec = load_spec()
    fields = [spec.id, *spec.request_columns]
    with httpx.Client(base_url=url, timeout=10) as client:
        for record in rows[fields].to_dict("records"):
            body = {k: (v.isoformat() if isinstance(v, pd.Timestamp) else v.item() if hasattr(v, "item") else v)
                    for k, v in record.items()}
            answer = client.post("/predict", json=body)
            assert answer.status_code == 200, answer.text
