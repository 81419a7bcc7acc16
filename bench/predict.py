"""`/predict` with its online aggregates updated by every event, against a peer tree's `/predict`.

    python -m bench.predict --peer /path/to/other/checkout [--rows 200000] [--duration 10]

Each tree gets a fresh home: `generate` (the same batch), `run` (its champion), then `sluicegate serve`;
wrk sends the day after the batch, every transaction once, in time order, as distinct events (their own
ids and times) at 16 connections. The table gives req/s and latency of both in this same run, and the
ratios; then the online state's cost: microseconds per event scored and recorded (one at a time and in
micro-batches of 64) and bytes per entity key. Needs wrk (`apt-get install -y wrk`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench.serve import WRK_HINT, parse_wrk, start, stop

REPO = Path(__file__).resolve().parents[1]
PROMOTE_ANYWAY = """
from sluicegate.config import Settings
from sluicegate.ship import registry
s = Settings(); c = registry.configure(s)
if registry.version_by_alias(c, s.model_name, registry.CHAMPION) is None:
    v = registry.version_by_alias(c, s.model_name, registry.CHALLENGER)
    c.set_registered_model_alias(s.model_name, registry.CHAMPION, v.version)
"""


def tree_env(src: Path, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICEGATE_")}
    return {**env, "PYTHONPATH": str(src), "SLUICEGATE_HOME": str(home), "SLUICEGATE_SERVE_LOG_PREDICTIONS": "false"}


def prepare_home(src: Path, home: Path, rows: int, days: int) -> None:
    env = tree_env(src, home)
    for args in (["generate", "--rows", str(rows), "--days", str(days), "--seed", "7"], ["run"]):
        subprocess.run([sys.executable, "-m", "sluicegate", *args], env=env, cwd=src.parent, check=False,
                       capture_output=True)
    subprocess.run([sys.executable, "-c", PROMOTE_ANYWAY], env=env, cwd=src.parent, check=True)


def next_day_bodies(rows: int, days: int) -> list[str]:
    """Every transaction of the day after the batch, in time order, as /predict bodies."""
    from sluicegate.data.synthetic import GenerateConfig, generate_transactions
    from sluicegate.spec import load_spec

    spec = load_spec()
    start_day = pd.Timestamp("2026-10-01", tz="UTC") + pd.Timedelta(days=days)
    day = generate_transactions(GenerateConfig(rows=rows, days=days, seed=7, start=f"{start_day:%Y-%m-%d}"), spec)
    day = day[day[spec.timestamp] < start_day + pd.Timedelta(days=1)]
    fields = [spec.id, *spec.request_columns]
    return [json.dumps({k: (v.isoformat() if isinstance(v, pd.Timestamp) else v.item() if hasattr(v, "item") else v)
                        for k, v in record.items()}) for record in day[fields].to_dict("records")]


def lua(folder: Path, bodies: list[str]) -> Path:
    """A wrk script sending the bodies in order, each once (one shared counter per wrk thread)."""
    data = folder / "bodies.txt"
    data.write_text("\n".join(bodies) + "\n")
    script = folder / "events.lua"
    script.write_text(f"""
local bodies = {{}}
for line in io.lines("{data}") do bodies[#bodies + 1] = line end
local i = 0
request = function()
  i = i + 1
  if i > #bodies then i = 1 end
  return wrk.format("POST", "/predict", {{["Content-Type"] = "application/json"}}, bodies[i])
end
""")
    return script


def measure(src: Path, home: Path, script: Path, seconds: int, connections: int, log: Path) -> dict:
    port = _free_port()
    proc = start([sys.executable, "-m", "sluicegate", "serve", "--port", str(port)], tree_env(src, home),
                 f"http://127.0.0.1:{port}/v2/health/ready", log)
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
                              f"http://127.0.0.1:{port}/predict"], capture_output=True, text=True, check=True).stdout
        return parse_wrk(out)
    finally:
        stop(proc)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_cost(home: Path, bodies: list[str]) -> dict:
    """Microseconds per event through the online state (score and record), and bytes per entity key."""
    from sluicegate.config import Settings
    from sluicegate.features.online import OnlineFeatures, open_state, state_path

    settings = Settings(home=home)
    spec = settings.spec
    state = open_state(settings, spec)
    live = OnlineFeatures(spec, state)
    events = []
    for i, body in enumerate(bodies[:4096]):
        fields = json.loads(body)
        fields[spec.timestamp] = pd.Timestamp(fields[spec.timestamp]) + pd.Timedelta(days=1)  # after the run's
        events.append(live.event(fields, f"cost-{i}"))
    out = {}
    for size in (1, 64):
        part = events[:2048] if size == 1 else events[2048:]
        started = time.perf_counter()
        for i in range(0, len(part), size):
            live.score(part[i:i + size])
        out[f"us_per_event_batch_{size}"] = (time.perf_counter() - started) / len(part) * 1e6
    stats = state.stats()
    db = state_path(settings, settings.spec)
    size = db.stat().st_size + sum(p.stat().st_size for p in db.parent.glob(f"{db.name}-wal"))
    out |= {"events": stats["events"], "entity_keys": stats["entity_keys"],
            "bytes_per_entity_key": size / max(1, stats["entity_keys"]),
            "events_per_entity_key": stats["events"] / max(1, stats["entity_keys"])}
    state.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", type=Path, required=True, help="another checkout of Sluicegate (its src/ is used)")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per server")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit(WRK_HINT)
    work = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    bodies = next_day_bodies(args.rows, args.days)
    script = lua(work, bodies)
    results = {}
    for name, src in (("this tree", REPO / "src"), ("peer", args.peer.resolve() / "src")):
        home = work / name.replace(" ", "-")
        prepare_home(src, home, args.rows, args.days)
        results[name] = measure(src, home, script, args.duration, args.connections, work / f"{home.name}.log")
    cost = state_cost(work / "this-tree", bodies)
    ours, peer = results["this tree"], results["peer"]
    print(f"\n/predict, {len(bodies):,} distinct events of the day after a {args.rows:,}-row batch, wrk "
          f"{args.connections} connections, {args.duration} s, {os.cpu_count()} CPUs\n")
    print(f"{'server':<12} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7}")
    for name, r in results.items():
        print(f"{name:<12} {r['rps']:>10,.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['failed']:>7}")
    print(f"\nreq/s ratio (this tree / peer): {ours['rps'] / peer['rps']:.2f}; p99 ratio: "
          f"{ours['p99_ms'] / peer['p99_ms']:.2f}")
    print("online state: " + ", ".join(f"{k} {v:,.1f}" if isinstance(v, float) else f"{k} {v:,}"
                                       for k, v in cost.items()))
    print("RESULT " + json.dumps({"servers": results, "state": cost}, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
