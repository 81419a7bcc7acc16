"""The pipeline through a real two-worker Dask cluster (distributed's LocalCluster, two worker
processes) gives what the in-process path gives: the same training set hash, the same features and
the same gate decision. `SLUICEGATE_DASK_SCHEDULER` is the one setting that chooses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.timeout(900)]

SHARD_ROWS = "2000"  # small, so that this small table is cut into shards the workers share


@pytest.fixture(scope="module")
def cluster():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local:
        yield local


def _pipeline(home: Path, scheduler: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLUICEGATE_", "PREFECT_API_URL"))}
    env |= {"SLUICEGATE_HOME": str(home), "SLUICEGATE_GATES_PATH": str(REPO / "gates.yaml"),
            "SLUICEGATE_FEATURE_SHARD_ROWS": SHARD_ROWS}
    if scheduler:
        env["SLUICEGATE_DASK_SCHEDULER"] = scheduler
    for args in (["generate", "--rows", "12000", "--days", "6", "--seed", "21"], ["run", "--max-epochs", "2"]):
        out = subprocess.run([sys.executable, "-m", "sluicegate", *args], env=env, cwd=REPO, capture_output=True,
                             text=True)
        assert out.returncode in (0, 3), out.stdout[-3000:] + out.stderr[-3000:]  # 3: a gate blocked it
    from mlflow import MlflowClient

    from sluicegate.config import Settings

    settings = Settings(home=home)
    version = MlflowClient(settings.tracking_uri).get_model_version(settings.model_name, "1")
    features = settings.paths.features
    tables = {p.stem: pd.read_parquet(p) for p in sorted(features.glob("*.parquet"))}
    return {"tags": version.tags, "tables": tables, "exit": out.returncode}


def test_the_pipeline_through_a_two_worker_cluster_equals_the_in_process_one(cluster, tmp_path):
    here = _pipeline(tmp_path / "in-process", None)
    there = _pipeline(tmp_path / "cluster", cluster.scheduler_address)
    # The feature shards ran on the cluster's workers.
    assert any("entity_table" in name for name in cluster.scheduler.task_prefixes)
    assert there["tags"]["data_hash"] == here["tags"]["data_hash"]
    assert there["tags"]["gate_decision"] == here["tags"]["gate_decision"] and there["exit"] == here["exit"]
    assert set(there["tables"]) == set(here["tables"]) == {"row_features", "customer_features", "merchant_features"}
    for view, table in here["tables"].items():
        pd.testing.assert_frame_equal(there["tables"][view], table, check_like=False)
