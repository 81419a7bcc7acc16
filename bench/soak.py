"""Soak: the model server under steady load for minutes, with champion promotions during the run.

    python -m bench.soak [--minutes 10] [--connections 64] [--promotions 3]

Builds its own SLUICEGATE_HOME in a temporary folder (a small model, trained and registered as
versions 1..promotions+1), starts `sluicegate serve` on 127.0.0.1 and drives single-row v2 inference
with wrk, one wrk run per minute, so every minute has its own p99. Promotions move `champion` through
the registry (`registry.move_champion`, as `make deploy` does) at evenly spaced times; the server
hot-reloads each one. Server RSS is read from /proc after a warm-up minute and at the end.

Passes (exit 0) when no request failed (non-2xx, socket errors), every promotion was served and RSS
grew by at most 10%. Needs wrk (`apt-get install -y wrk`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from bench.serve import WRK_HINT, lua_script, parse_wrk, start, stop, v2_body

NAME = "fraud-detector"
KEY = "soak-key"
MAX_RSS_GROWTH = 0.10


@dataclass
class Minute:
    minute: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    failed: int
    rss_mb: float
    versions: str


def build_home(home: Path, versions: int) -> None:
    """Train one small model per version (seeds differ) and register them; v1 is champion."""
    import mlflow

    from sluicegate.config import Settings, ensure_home
    from sluicegate.data.synthetic import GenerateConfig, generate_transactions
    from sluicegate.features import stages as features_stages
    from sluicegate.ship import registry
    from sluicegate.ship.export import export_onnx
    from sluicegate.spec import load_spec
    from sluicegate.train import stages as train_stages
    from sluicegate.train.config import TrainConfig

    os.environ["SLUICEGATE_HOME"] = str(home)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    settings = Settings()
    ensure_home(settings.paths)
    spec = load_spec()
    frame = generate_transactions(GenerateConfig(rows=6000, days=4, seed=3), spec)
    prepared = train_stages.prepare(features_stages.feature_stage(settings, spec, frame).frame, spec)
    client = registry.configure(settings)
    for seed in range(versions):
        cfg = TrainConfig(max_epochs=1, hidden=32, device="cpu", precision="fp32", seed=seed)
        trained = train_stages.train_stage(prepared, spec, cfg, home / f"ckpt-{seed}")
        onnx_path = export_onnx(trained.model, prepared.train, home / "work" / f"model-{seed}.onnx")
        with mlflow.start_run():
            info = registry.log_onnx_model(onnx_path)
            version = registry.register_candidate(client, NAME, info, mlflow.active_run().info.run_id, onnx_path,
                                                  {"threshold": "0.3", "variant": "fp32"})
    registry.move_champion(client, NAME, "1", None, {"event": "promote", "actor": "soak", "reason": "start"},
                           settings.paths.locks)
    assert str(version.version) == str(versions)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wrk_minute(url: str, script: Path, connections: int, seconds: int, threads: int) -> dict:
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
                          "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    return parse_wrk(out)


def promote_at(times: list[float], home: Path, base: str, log: list[dict], stop_event: threading.Event) -> None:
    """Move champion to v2, v3, ... at the given seconds from now; wait until the server serves each."""
    from sluicegate.config import Settings
    from sluicegate.ship import registry

    settings = Settings(home=home)
    client = registry.configure(settings)
    began = time.monotonic()
    for i, at in enumerate(times):
        if stop_event.wait(max(0.0, at - (time.monotonic() - began))):
            return
        version, previous = str(i + 2), str(i + 1)
        moved = time.monotonic()
        registry.move_champion(client, NAME, version, previous,
                               {"event": "promote", "actor": "soak", "reason": f"promotion {i + 1}"},
                               settings.paths.locks)
        served = None
        while served is None and time.monotonic() - moved < 120:
            answer = httpx.get(f"{base}/v2/models/{NAME}/ready", timeout=5).json()
            served = time.monotonic() if answer.get("version") == version else None
            time.sleep(0.1)
        log.append({"version": version, "at_s": round(moved - began, 1),
                    "served_after_s": round(served - moved, 2) if served else None})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--promotions", type=int, default=3)
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (1 leaves a core to the server)")
    parser.add_argument("--warmup-seconds", type=int, default=30, help="load before RSS is first read")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print(WRK_HINT, file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="sluicegate-soak-") as tmp:
        root = Path(tmp)
        home = root / "home"
        print(f"building {args.promotions + 1} model versions in {home} ...", flush=True)
        build_home(home, args.promotions + 1)
        port = int(os.environ.get("SOAK_PORT", "18088"))
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "SLUICEGATE_HOME": str(home), "SLUICEGATE_SERVE_API_KEYS": KEY,
               "SLUICEGATE_SERVE_POLL_INTERVAL_S": "1"}
        server = start([sys.executable, "-m", "sluicegate", "serve", "--port", str(port)], env,
                       f"{base}/v2/health/ready", root / "server.log")
        script = lua_script(root, "v2", v2_body())
        script.write_text(script.read_text() + f"wrk.headers['Authorization'] = 'Bearer {KEY}'\n")
        url = f"{base}/v2/models/{NAME}/infer"
        minutes: list[Minute] = []
        promotions: list[dict] = []
        stop_event = threading.Event()
        try:
            wrk_minute(url, script, args.connections, args.warmup_seconds, args.wrk_threads)
            rss_start = rss_mb(server.pid)
            total = args.minutes * 60
            times = [total * (i + 1) / (args.promotions + 1) for i in range(args.promotions)]
            promoter = threading.Thread(target=promote_at, args=(times, home, base, promotions, stop_event))
            promoter.start()
            for m in range(1, args.minutes + 1):
                before = len(promotions)
                result = wrk_minute(url, script, args.connections, 60, args.wrk_threads)
                served = ",".join(p["version"] for p in promotions[before:])
                minutes.append(Minute(m, **result, rss_mb=round(rss_mb(server.pid), 1),
                                      versions=f"-> v{served}" if served else ""))
                print(f"minute {m}: {result['rps']:,.0f} req/s, p99 {result['p99_ms']:.2f} ms, "
                      f"failed {result['failed']}, RSS {minutes[-1].rss_mb:.1f} MB {minutes[-1].versions}",
                      flush=True)
            stop_event.set()
            promoter.join(timeout=180)
            metrics = httpx.get(f"{base}/metrics", timeout=5).text
        finally:
            stop_event.set()
            stop(server)
        rss_end = minutes[-1].rss_mb
        server_errors = sum(float(line.split()[-1]) for line in metrics.splitlines()
                            if line.startswith("sluicegate_requests_total") and 'code="200"' not in line)

    growth = (rss_end - rss_start) / rss_start
    failed = sum(m.failed for m in minutes)
    requests = sum(m.requests for m in minutes)
    print(f"\nSoak: {args.minutes} min, {args.connections} connections, wrk -t{args.wrk_threads}, single-row v2 "
          f"inference, {os.cpu_count()} CPUs\n")
    print("| minute | requests | req/s | p50 ms | p99 ms | failed | server RSS MB | promotion |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for m in minutes:
        print(f"| {m.minute} | {m.requests:,} | {m.rps:,.0f} | {m.p50_ms:.2f} | {m.p99_ms:.2f} | {m.failed} | "
              f"{m.rss_mb:.1f} | {m.versions} |")
    print(f"\nrequests {requests:,}, failed {failed} (server-side non-200: {server_errors:.0f}); "
          f"RSS {rss_start:.1f} -> {rss_end:.1f} MB ({growth:+.1%}); promotions: "
          + ", ".join(f"v{p['version']} at {p['at_s']}s served after {p['served_after_s']}s" for p in promotions))
    ok = (failed == 0 and server_errors == 0 and growth <= MAX_RSS_GROWTH and len(promotions) == args.promotions
          and all(p["served_after_s"] is not None for p in promotions))
    if args.json:
        args.json.write_text(json.dumps({"minutes": [asdict(m) for m in minutes], "promotions": promotions,
                                         "requests": requests, "failed": failed, "server_non_200": server_errors,
                                         "rss_start_mb": rss_start, "rss_end_mb": rss_end, "rss_growth": growth,
                                         "ok": ok}, indent=2))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
