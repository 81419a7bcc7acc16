"""Serving benchmark: our server vs `mlflow models serve` on the same ONNX model, and a bare ASGI ceiling.

    python -m bench.serve [--duration 8] [--repeat 3] [--connections 16,64]

Needs a champion in SLUICEGATE_HOME (`make demo`) and wrk (`apt-get install -y wrk`).
Every server is driven by the same wrk load (single-row requests, POST bodies
from a Lua script); the table quotes ratios measured in this same run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import orjson

REPO = Path(__file__).resolve().parents[1]
# One row of the default example's 18 numeric inputs (values only need to be finite).
NUMERIC_ROW = [1.5, 0.1, 0.0, 1.0, 0.2, 0.0, 5.0, 0.0, 1.0, 2.0, 0.01, 0.0, 0.5, 0.8, 0.1, 0.0, 0.2, 0.0]
CATEGORICAL_ROW = [1, 2, 3, 4]
WRK_HINT = "wrk is not installed: `apt-get update && apt-get install -y wrk` (Debian/Ubuntu) or `brew install wrk`."


async def bare_app(scope, receive, send):
    """The ceiling: reads the body and answers a small JSON object, nothing else."""
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = orjson.dumps({"outputs": [{"name": "probability", "data": [0.5]}]})
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@dataclass
class Result:
    target: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def v2_body() -> bytes:
    return orjson.dumps({"inputs": [
        {"name": "numeric", "shape": [1, len(NUMERIC_ROW)], "datatype": "FP32", "data": NUMERIC_ROW},
        {"name": "categorical", "shape": [1, 4], "datatype": "INT64", "data": CATEGORICAL_ROW}]})


def mlflow_body() -> bytes:
    return orjson.dumps({"inputs": {"numeric": [NUMERIC_ROW], "categorical": [CATEGORICAL_ROW]}})


def lua_script(folder: Path, name: str, body: bytes) -> Path:
    path = folder / f"{name}.lua"
    text = body.decode().replace("\\", "\\\\").replace("'", "\\'")
    path.write_text(f"wrk.method = 'POST'\nwrk.headers['Content-Type'] = 'application/json'\nwrk.body = '{text}'\n")
    return path


def _ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def parse_wrk(out: str) -> dict:
    """Requests, req/s, p50/p99 and failed requests (non-2xx plus socket errors) from `wrk --latency` output."""
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non_2xx = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", out))
    return {"requests": int(re.search(r"(\d+) requests in", out).group(1)),
            "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
            "p50_ms": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),
            "p99_ms": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),
            "failed": non_2xx + (sum(int(n) for n in socket.groups()) if socket else 0)}


def wrk(url: str, script: Path, connections: int, seconds: int, threads: int) -> tuple[float, float, float, int]:
    out = subprocess.run(["wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s", "--latency",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    result = parse_wrk(out)
    return result["rps"], result["p50_ms"], result["p99_ms"], result["failed"]


def start(cmd: list[str], env: dict, ready_url: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[:4]} exited; see {log}")
        try:
            if httpx.get(ready_url, timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"{cmd[:4]} not ready after 180 s; see {log}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def champion_onnx(folder: Path) -> tuple[Path, str]:
    """The champion's ONNX (hash-checked) and an MLflow model folder holding the same file."""
    import mlflow.onnx
    import onnx
    from mlflow.models import infer_signature

    from sluicegate.config import Settings
    from sluicegate.ship import registry
    from sluicegate.ship.loader import fetch_onnx, registry_client

    settings = Settings()
    client = registry_client(settings)
    version = registry.version_by_alias(client, settings.model_name, registry.CHAMPION)
    if version is None:
        raise SystemExit(f"no {settings.model_name}@champion in {settings.home}: run `make demo` first")
    path = folder / "model.onnx"
    path.write_bytes(fetch_onnx(client, version))
    example = {"numeric": np.zeros((2, len(NUMERIC_ROW)), np.float32), "categorical": np.ones((2, 4), np.int64)}
    signature = infer_signature(example, np.zeros(2, np.float32))
    mlflow.onnx.save_model(onnx.load(str(path)), str(folder / "mlflow_model"), signature=signature,
                           onnx_execution_providers=["CPUExecutionProvider"])
    return folder / "mlflow_model", str(version.version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=8, help="seconds per measurement")
    parser.add_argument("--repeat", type=int, default=3,
                        help="measurements per load; the table shows the median by req/s (a shared VM is noisy)")
    parser.add_argument("--warmup", type=int, default=5, help="seconds of load before measuring")
    parser.add_argument("--connections", default="16,64", help="comma-separated connection counts")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (1 leaves a core to the server)")
    parser.add_argument("--port", type=int, default=18080, help="first of three ports")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print(WRK_HINT, file=sys.stderr)
        return 2
    from sluicegate.config import Settings
    connections = [int(c) for c in args.connections.split(",")]
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = Path(tmp)
        mlflow_model, version = champion_onnx(folder)
        ours, theirs, bare = args.port, args.port + 1, args.port + 2
        model = Settings().model_name
        targets = [
            ("sluicegate v2", [sys.executable, "-m", "sluicegate", "serve", "--port", str(ours)],
             f"http://127.0.0.1:{ours}/v2/health/ready",
             # /predict counts every event it scores: one body sent again and again is a stream of
             # retries, not traffic; bench/predict.py sends a real day of distinct events.
             [("sluicegate v2", f"http://127.0.0.1:{ours}/v2/models/{model}/infer", v2_body())]),
            ("mlflow models serve", [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(mlflow_model),
                                     "-p", str(theirs), "--env-manager", "local", "-w", "1"],
             f"http://127.0.0.1:{theirs}/ping",
             [("mlflow models serve", f"http://127.0.0.1:{theirs}/invocations", mlflow_body())]),
            ("bare ASGI", [sys.executable, "-m", "uvicorn", "bench.serve:bare_app", "--port", str(bare),
                           "--loop", "uvloop", "--http", "httptools", "--no-access-log", "--no-proxy-headers",
                           "--log-level", "warning"],
             f"http://127.0.0.1:{bare}/", [("bare ASGI (ceiling)", f"http://127.0.0.1:{bare}/", v2_body())]),
        ]
        for name, cmd, ready, loads in targets:
            print(f"starting {name} ...", file=sys.stderr)
            proc = start(cmd, env, ready, folder / f"{name.split()[0]}.log")
            try:
                for label, url, body in loads:
                    script = lua_script(folder, re.sub(r"\W+", "_", label), body)
                    wrk(url, script, connections[0], args.warmup, args.wrk_threads)
                    for c in connections:
                        runs = sorted((wrk(url, script, c, args.duration, args.wrk_threads)
                                       for _ in range(args.repeat)), key=lambda run: run[0])
                        rps, p50, p99, errors = runs[len(runs) // 2]
                        errors = sum(run[3] for run in runs)  # a failure in any run counts
                        results.append(Result(label, c, rps, p50, p99, errors))
                        print(f"  {label:28} c={c:<3} {rps:>9,.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:7.2f} ms",
                              file=sys.stderr)
            finally:
                stop(proc)
    print_table(results, version, connections)
    return 0


def print_table(results: list[Result], version: str, connections: list[int]) -> None:
    print(f"\nServing benchmark: champion v{version}, single-row requests, wrk, {os.cpu_count()} CPUs\n")
    print("| target | conns | req/s | p50 ms | p99 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r.target} | {r.connections} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} |")
    by = {(r.target, r.connections): r for r in results}
    print()
    for c in connections:
        ours, mlflow, bare = (by.get((t, c)) for t in ("sluicegate v2", "mlflow models serve", "bare ASGI (ceiling)"))
        if ours and mlflow and bare:
            print(f"c={c}: sluicegate v2 = {ours.rps / mlflow.rps:.1f}x mlflow models serve req/s, "
                  f"{ours.rps / bare.rps:.0%} of the bare-ASGI ceiling; p99 {ours.p99_ms:.2f} ms vs "
                  f"{mlflow.p99_ms:.2f} ms")


if __name__ == "__main__":
    sys.exit(main())
