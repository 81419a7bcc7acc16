"""Real parts for tests: the CLI in a subprocess, a `sluicegate serve` subprocess, rows sent to it as a
caller would, and waiting for a server to answer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pandas as pd
import pytest

from sluicegate.spec import load_spec


def fetch_example(example: Path) -> Path:
    """An example table's CSV, as its `fetch.sh` takes it from the registry (quick once fetched)."""
    out = subprocess.run(["bash", str(example / "fetch.sh")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr
    return Path(out.stdout.strip())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sluicegate(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, in env["WORK"]; with `check`, a non-zero exit fails with its output."""
    out = subprocess.run([sys.executable, "-m", "sluicegate", *args], capture_output=True, text=True, env=env,
                         cwd=env.get("WORK"))
    if check:
        assert out.returncode == 0, f"sluicegate {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def wait_until_ok(url: str, what: str, seconds: float = 120, process: subprocess.Popen | None = None,
                  log: Path | None = None) -> dict:
    """Poll `url` until it answers 200 (its JSON body, or {}); fails the test when `process` exits first
    (with the tail of `log`) or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            pytest.fail(f"{what} exited with {process.returncode}" + (f":\n{log.read_text()[-3000:]}" if log else ""))
        try:
            answer = httpx.get(url, timeout=2)
            if answer.status_code == 200:
                return answer.json() if answer.headers.get("content-type", "").startswith("application/json") else {}
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{what} did not become ready in {seconds:.0f} s")


@contextmanager
def model_server(env: dict, *specs: Path):
    """A real `sluicegate serve` in a subprocess with this environment (each spec a `--spec`; none: the
    built-in example); its URL once ready."""
    port = _free_port()
    args = [a for spec in specs for a in ("--spec", str(spec))]
    server = subprocess.Popen([sys.executable, "-m", "sluicegate", "serve", *args, "--port", str(port)], env=env,
                              cwd=env.get("WORK"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ok(f"{url}/v2/health/ready", "the model server", process=server)
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
