"""How the pipeline's cost grows with the table: seconds per stage, cost per million rows, the
largest/smallest per-row ratio and the peak RSS (per stage and in all), for each size in the same run.

Each size gets a fresh SLUICEGATE_HOME; `sluicegate generate` writes the batch in a process of its
own, then the training pipeline runs in another, whose peak RSS (the kernel's high-water mark for
that process, `ru_maxrss`) is the figure quoted. The ratio column is each stage's seconds per row
at the largest size over the same at the smallest.

    python bench/scale.py [--rows 1000000,10000000] [--days 30] [--max-epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The pipeline, run in a child process so that its peak RSS is its own.
CHILD = """
import json, sys
from sluicegate.config import Settings
from sluicegate.flows.pipeline import PipelineParams, training_pipeline
from sluicegate.ship import registry
result = training_pipeline(PipelineParams(max_epochs=int(sys.argv[1]), actor="bench/scale"))
metrics = registry.configure(Settings()).get_run(result["mlflow_run_id"]).data.metrics
print("RESULT " + json.dumps({"status": result.get("status"), "stage_seconds": result.get("stage_seconds", {}),
                             "stage_peak_gb": result.get("stage_peak_gb", {}), "pr_auc": metrics.get("pr_auc")}))
"""


def run_size(rows: int, days: int, max_epochs: int, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICEGATE_", "PREFECT_API_URL"))}
    env |= {"SLUICEGATE_HOME": str(work / f"home-{rows}"), "SLUICEGATE_GATES_PATH": str(REPO / "gates.yaml")}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "sluicegate", "generate", "--rows", str(rows), "--days", str(days)],
                   env=env, check=True, capture_output=True, cwd=REPO)
    generate_s = time.perf_counter() - started
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(max_epochs)], env=env, stdout=stdout,
                                 stderr=stderr, text=True, cwd=REPO)
        # wait4 gives this child's own resource usage: ru_maxrss is its peak RSS (KiB on Linux).
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        stdout.seek(0), stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    if child.returncode != 0:
        raise SystemExit(f"pipeline at {rows:,} rows failed:\n{out[-2000:]}\n{err[-3000:]}")
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    # The pipeline resets the kernel's high-water mark at each stage (its per-stage peaks), so the
    # process's peak is the largest of those and what ru_maxrss saw after the last reset.
    peak = max([usage.ru_maxrss / 1024 / 1024, *result["stage_peak_gb"].values()])
    return {"rows": rows, "generate": generate_s, "pipeline": wall, "peak_gb": peak, **result}


def print_table(results: list[dict]) -> None:
    small, large = results[0], results[-1]
    stages = list(large["stage_seconds"])
    header = ["stage", *(f"{r['rows'] / 1e6:g}M s" for r in results), *(f"{r['rows'] / 1e6:g}M s/1M" for r in results),
              f"{large['rows'] / 1e6:g}M/{small['rows'] / 1e6:g}M per row",
              *(f"{r['rows'] / 1e6:g}M peak GB" for r in results)]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for stage in [*stages, "pipeline"]:
        def seconds(r: dict, stage: str = stage) -> float:
            return r["pipeline"] if stage == "pipeline" else r["stage_seconds"].get(stage, float("nan"))
        per = [seconds(r) / r["rows"] * 1e6 for r in results]
        peaks = [r["peak_gb"] if stage == "pipeline" else r["stage_peak_gb"].get(stage, float("nan")) for r in results]
        cells = ([f"{seconds(r):.1f}" for r in results] + [f"{p:.2f}" for p in per] + [f"{per[-1] / per[0]:.2f}"]
                 + [f"{p:.2f}" for p in peaks])
        print(f"| {stage} | " + " | ".join(cells) + " |")
    print()
    for r in results:
        print(f"{r['rows']:,} rows: peak RSS of the pipeline {r['peak_gb']:.2f} GB, generate {r['generate']:.1f} s, "
              f"status {r['status']}, PR-AUC {r['pr_auc'] or float('nan'):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1000000,10000000", help="comma-separated sizes, smallest first")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--max-epochs", type=int, default=3)
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.rows.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        results = []
        for rows in sizes:
            print(f"{rows:,} rows ...", file=sys.stderr)
            results.append(run_size(rows, args.days, args.max_epochs, Path(tmp)))
    print_table(results)


if __name__ == "__main__":
    main()
