"""The spec-driven feature stage against the hand-written one it replaced, on the same rows in one run.

The peer is the hand-written code as it was in git (`--peer-ref`, default the last commit before the
spec-driven stage): its `compute_feature_tables` is loaded from that commit's source and run on the
same generated transactions. Both compute the same seven aggregates of the example table; the ratio is
spec-driven seconds over hand-written seconds (median of `--repeat` runs), and the values are compared.

    python bench/features.py [--rows 1000000] [--days 30] [--repeat 3] [--peer-ref b5a3df8]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from sluicegate.data.synthetic import GenerateConfig, generate_transactions
from sluicegate.features import aggregates as spec_driven
from sluicegate.features import catalog
from sluicegate.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
PEER_REF = "b5a3df8"  # the hand-written feature stage, before the spec drove it


def load_peer(ref: str) -> types.ModuleType:
    """The hand-written feature module of `ref`, importable beside today's package."""
    def show(path: str) -> str:
        return subprocess.run(["git", "show", f"{ref}:{path}"], cwd=REPO, check=True, capture_output=True,
                              text=True).stdout

    tmp = Path(tempfile.mkdtemp(prefix="peer-features-"))
    (tmp / "peer_catalog.py").write_text(show("src/sluicegate/features/catalog.py"))
    source = show("src/sluicegate/features/store.py").replace("from sluicegate.features.catalog import",
                                                            "from peer_catalog import")
    (tmp / "peer_store.py").write_text(source.replace("from sluicegate.spec import DatasetSpec, load_spec",
                                                      "DatasetSpec = load_spec = None"))
    sys.path.insert(0, str(tmp))
    import peer_store

    return peer_store


def old_spec_view(spec):
    """The attributes the hand-written code read from its spec."""
    return types.SimpleNamespace(timestamp=spec.timestamp, amount="amount", label=spec.label,
                                 entities=types.SimpleNamespace(customer=spec.entities["customer"].key,
                                                                merchant=spec.entities["merchant"].key))


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--peer-ref", default=PEER_REF)
    args = parser.parse_args()

    spec = load_spec()
    rows = generate_transactions(GenerateConfig(rows=args.rows, days=args.days, seed=7), spec)
    peer = load_peer(args.peer_ref)
    old, (old_customer, old_merchant) = timed(lambda: peer.compute_feature_tables(rows, old_spec_view(spec)),
                                              args.repeat)
    new, tables = timed(lambda: spec_driven.compute_feature_tables(rows, spec), args.repeat)

    customer, merchant = tables[catalog.entity_view("customer")], tables[catalog.entity_view("merchant")]
    # Time since previous is stored as the gap itself, in seconds (the hand-written code kept minutes).
    worst = 0.0
    for old_table, new_table in ((old_customer, customer), (old_merchant, merchant)):
        for name in old_table.columns[2:]:
            new_name = name if name in new_table else "cust_seconds_since_prev"
            scale = 60.0 if new_name != name else 1.0  # minutes then, seconds now
            a = old_table[name].to_numpy(dtype=float) * scale
            b = new_table[new_name].to_numpy(dtype=float)
            worst = max(worst, float(np.nanmax(np.abs(a - b))) if len(a) else 0.0)
    print(f"{args.rows:,} transactions over {args.days} days, median of {args.repeat} runs")
    print(f"{'feature tables':<28} {'seconds':>8} {'s per 1M rows':>14} {'ratio':>7}")
    print(f"{'hand-written (' + args.peer_ref + ')':<28} {old:>8.2f} {old / args.rows * 1e6:>14.2f} {1.0:>7.2f}")
    print(f"{'spec-driven':<28} {new:>8.2f} {new / args.rows * 1e6:>14.2f} {new / old:>7.2f}")
    print(f"largest difference between the two on any feature value: {worst:.3g}")


if __name__ == "__main__":
    main()
