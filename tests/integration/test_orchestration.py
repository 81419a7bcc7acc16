"""What the Prefect server sees, against a real one (Prefect's test harness): a run a gate blocked ends
Failed saying why, whichever way it was started, while `sluicegate run` keeps exit 3; retrains record
their outcome in the retrain ledger; and the global concurrency limits `train-<model>` and
`promote-<model>` keep two processes (two machines: each with its own SLUICEGATE_HOME, so no file
lock can be what serializes them) out of the same section at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from sluicegate.config import Settings
from sluicegate.data.batches import write_batch
from sluicegate.data.synthetic import GenerateConfig, generate_transactions, inject_fault
from tests.conftest import REPO

pytestmark = [pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def api():
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


def _flow_run(flow_run_id):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id)


def _runs_named(flow_name: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])))


def _limit(name: str):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return None


def _write(spec, cfg: GenerateConfig) -> str:
    write_batch(inject_fault(generate_transactions(cfg, spec), cfg.fault, spec, cfg.seed), Settings().paths.raw,
                cfg.batch_id, spec.timestamp)
    return cfg.batch_id


# ------------------------------------------------------------------ how a blocked run ends

def test_a_gated_flow_ends_failed_when_blocked_and_still_answers_in_process(api):
    from sluicegate.flows.outcome import finish, gated_flow

    @gated_flow(name="gated-probe")
    def probe(status: str) -> dict:
        if status == "error":
            raise RuntimeError("a real failure")
        return finish({"status": status, "reason": "min_pr_auc: 0.1 < 0.3", "version": "7"})

    assert probe("blocked_model") == {"status": "blocked_model", "reason": "min_pr_auc: 0.1 < 0.3", "version": "7"}
    state = probe("blocked_model", return_state=True)
    assert state.is_failed() and state.message == "blocked by gates: min_pr_auc: 0.1 < 0.3 (v7 stays challenger)"
    server = _flow_run(state.state_details.flow_run_id)
    assert server.state.type.value == "FAILED" and server.state.message == state.message
    assert probe("promoted")["status"] == "promoted"
    assert probe("promoted", return_state=True).is_completed()
    with pytest.raises(RuntimeError, match="a real failure"):  # any other failure raises, as from any flow
        probe("error")


def test_sluicegate_run_on_a_poisoned_batch_exits_3_and_its_flow_run_is_failed(api, home, spec):
    batch = _write(spec, GenerateConfig(rows=3_000, days=3, seed=8, fault="out_of_range"))
    env = {**os.environ, "PREFECT_API_URL": api}
    proc = subprocess.run([sys.executable, "-m", "sluicegate", "run", "--batch", batch, "--max-epochs", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 3, proc.stderr[-3000:]
    said = " ".join(proc.stderr.split())
    assert "Blocked at validation" in said and "Failing on their own" in said
    (run,) = [r for r in _runs_named("training-pipeline") if r.parameters["params"]["batch"] == batch]
    assert run.state.type.value == "FAILED"
    assert run.state.message.startswith(f"blocked by gates: validation: Batch {batch} failed")


def test_a_poisoned_nightly_window_fails_the_retrain_and_is_recorded(api, home, spec):
    from sluicegate.data import stages as data
    from sluicegate.flows.retrain import RetrainParams, scheduled_retrain
    from sluicegate.operate import retrains
    from sluicegate.operate import stages as operate

    _write(spec, GenerateConfig(rows=3_000, days=3, seed=9))
    bad = _write(spec, GenerateConfig(rows=1_000, days=1, seed=10, start="2026-10-04", fault="nulls"))
    state = scheduled_retrain(RetrainParams(window_days=4, max_epochs=1), return_state=True)
    assert state.is_failed() and state.message.startswith("blocked by gates: validation: Batch window_")
    result = state.result(raise_on_failure=False)
    assert result["status"] == "blocked_data" and result["bad_days"] == ["2026-10-04"]
    (subflow,) = [r for r in _runs_named("training-pipeline")
                  if r.parameters["params"]["batch"] == result["window"]["batch_id"]]
    assert subflow.state.type.value == "FAILED"  # the training-pipeline run under it too
    streak = retrains.blocked_streak(retrains.ledger_path(Settings()))
    assert streak.count == 1 and streak.last_reason.startswith("validation: Batch window_")
    assert retrains.history(retrains.ledger_path(Settings()))[-1]["kind"] == "scheduled"
    # The same poisoned day is not picked again: the next window leaves it out and names it.
    assert [e["day"] for e in data.quarantined_partitions(Settings().paths.quarantine)] == ["2026-10-04"]
    window = operate.retrain_window(Settings(), 4)
    assert "2026-10-04" not in window.days and bad in window.skipped["2026-10-04"]


def test_a_triggered_retrain_a_gate_blocks_ends_failed_and_held_both_slots(api, home, spec, tmp_path, monkeypatch):
    """The real pipeline, with a policy no model passes: the run ends Failed with the gate's reason, the
    ledger counts it as a blocked triggered retrain, and training and gating each ran holding its slot."""
    from prefect import tags

    from sluicegate.flows.pipeline import PipelineParams, training_pipeline
    from sluicegate.operate import retrains
    from sluicegate.ship import promote
    from sluicegate.train import stages as training

    policy = yaml.safe_load((REPO / "gates.yaml").read_text()) | {"min_pr_auc": 0.999, "latency_slo_p99_ms": 1000.0}
    (tmp_path / "gates.yaml").write_text(yaml.safe_dump(policy))
    monkeypatch.setenv("SLUICEGATE_GATES_PATH", str(tmp_path / "gates.yaml"))
    batch = _write(spec, GenerateConfig(rows=8_000, days=4, seed=12))
    held: dict[str, int] = {}

    def watched(stage, original, limit):
        def run(*args, **kwargs):
            held[stage] = _limit(limit).active_slots
            return original(*args, **kwargs)
        return run

    monkeypatch.setattr(training, "train_stage", watched("train", training.train_stage, "train-fraud-detector"))
    monkeypatch.setattr(promote, "gate_stage", watched("gate", promote.gate_stage, "promote-fraud-detector"))
    with tags("drift-retrain"):
        state = training_pipeline(PipelineParams(batch=batch, max_epochs=1, actor="monitor: amount PSI 0.4 >= 0.25"),
                                  return_state=True)
    result = state.result(raise_on_failure=False)
    assert state.is_failed(), result
    assert result["status"] == "blocked_model" and "min_pr_auc" in result["reason"]
    assert state.message == f"blocked by gates: {result['reason']} (v{result['version']} stays challenger)"
    assert _flow_run(state.state_details.flow_run_id).state.type.value == "FAILED"
    streak = retrains.blocked_streak(retrains.ledger_path(Settings()))
    assert (streak.count, streak.last_version) == (1, result["version"])
    assert retrains.history(retrains.ledger_path(Settings()))[-1]["kind"] == "triggered"
    assert held == {"train": 1, "gate": 1}  # each stage ran inside its global concurrency slot
    for name in ("train-fraud-detector", "promote-fraud-detector"):
        limit = _limit(name)
        assert limit.limit == 1 and limit.active_slots == 0, name  # created with one slot, released after


# ------------------------------------------------------------------ one at a time across processes

CONTENDER = textwrap.dedent('''
    import json, sys, time
    from pathlib import Path
    from prefect import flow
    from sluicegate.config import Settings
    from sluicegate.flows.limits import one_at_a_time

    @flow(name="contender")
    def contend(kind: str, ready: str, me: str, hold: float) -> dict:
        Path(ready, me).touch()
        deadline = time.monotonic() + 120
        while len(list(Path(ready).iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # both are up and about to ask for the slot: they contend for it
        with one_at_a_time(kind, Settings()):
            start = time.time()
            time.sleep(hold)
            end = time.time()
        return {"start": start, "end": end}

    print("SPAN " + json.dumps(contend(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]))))
''')


# Long enough that, with two slots, the second process is surely inside before the first leaves: on a
# loaded machine asking the server for a slot took over 2 s.
HOLD_S = "6.0"


def _contend(api: str, tmp_path: Path, kind: str, model: str, round_: str) -> list[dict]:
    """Two processes, each with its own SLUICEGATE_HOME (as on two machines), both asking for the slot."""
    script = tmp_path / "contender.py"
    script.write_text(CONTENDER)
    ready = tmp_path / f"ready-{round_}"
    ready.mkdir()
    procs = []
    for me in ("a", "b"):
        env = {**os.environ, "PREFECT_API_URL": api, "SLUICEGATE_HOME": str(tmp_path / f"home-{me}"),
               "SLUICEGATE_MODEL_NAME": model, "PYTHONPATH": str(REPO / "src")}
        procs.append(subprocess.Popen([sys.executable, str(script), kind, str(ready), me, HOLD_S], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    spans = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        spans.append(json.loads(next(line for line in out.splitlines() if line.startswith("SPAN "))[5:]))
    return sorted(spans, key=lambda s: s["start"])


@pytest.mark.parametrize("kind", ["train", "promote"])
def test_two_processes_never_hold_the_same_slot_at_once(api, tmp_path, kind):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    model = f"contended-{kind}"
    name = f"{kind}-{model}"
    assert _limit(name) is None  # a fresh server: the first to ask creates it
    first, second = _contend(api, tmp_path, kind, model, "1")
    assert first["end"] <= second["start"], (first, second)  # one after the other, never both inside
    assert _limit(name).limit == 1 and _limit(name).active_slots == 0

    # The check can see an overlap: with two slots the same two processes are inside together.
    with get_client(sync_client=True) as client:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=2))
    first, second = _contend(api, tmp_path, kind, model, "2")
    assert second["start"] < first["end"], (first, second)
