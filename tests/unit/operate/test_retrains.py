"""The retrain ledger: blocked retrains counted in a row, a promotion or a reset ends the streak, and the
monitor stops triggering once `max_blocked_retrains` were blocked in a row."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from sluicegate.operate import monitor as m
from sluicegate.operate import retrains
from sluicegate.operate import stages as operate
from sluicegate.policy import DriftThresholds

REPO = Path(__file__).resolve().parents[3]
T = DriftThresholds(psi_warn=0.1, psi_retrain=0.25, score_psi_retrain=0.25, min_recall=0.5, cooldown_hours=6,
                    min_rows=100, max_blocked_retrains=3)


def test_blocked_retrains_count_in_a_row_and_a_promotion_ends_the_streak(tmp_path):
    ledger = tmp_path / "monitoring" / "retrains.json"
    assert retrains.blocked_streak(ledger) == retrains.Streak()  # no ledger yet: no streak
    retrains.record_outcome(ledger, "blocked", "4", "min_pr_auc: 0.21 < 0.3", kind="scheduled")
    streak = retrains.record_outcome(ledger, "blocked", "5", "max_ece: 0.04 > 0.02", kind="triggered")
    assert (streak.count, streak.last_version, streak.last_reason) == (2, "5", "max_ece: 0.04 > 0.02")
    assert retrains.blocked_streak(ledger) == streak
    assert retrains.record_outcome(ledger, "promoted", "6", "all 12 gates passed").count == 0
    assert retrains.record_outcome(ledger, "blocked", "7", "server_load: ...").count == 1
    assert [e["event"] for e in retrains.history(ledger)] == ["blocked", "blocked", "promoted", "blocked"]
    with pytest.raises(ValueError, match="promoted' or 'blocked"):
        retrains.record_outcome(ledger, "lost_race", "8", "")


def test_reset_clears_the_streak_and_records_who(tmp_path):
    ledger = tmp_path / "retrains.json"
    for v in ("1", "2", "3"):
        retrains.record_outcome(ledger, "blocked", v, f"v{v} blocked")
    cleared = retrains.reset(ledger, "alice", "fixed the upstream feed")
    assert cleared.count == 3 and retrains.blocked_streak(ledger).count == 0
    last = retrains.history(ledger)[-1]
    assert (last["event"], last["actor"], last["reason"], last["cleared"]) == \
        ("reset", "alice", "fixed the upstream feed", 3)


def test_the_streak_is_exact_past_the_kept_history(tmp_path, monkeypatch):
    monkeypatch.setattr(retrains, "KEEP", 5)
    ledger = tmp_path / "retrains.json"
    for v in range(12):
        retrains.record_outcome(ledger, "blocked", str(v), "blocked")
    assert retrains.blocked_streak(ledger).count == 12 and len(retrains.history(ledger)) == 5


def test_an_unreadable_ledger_says_so_and_reset_rewrites_it(tmp_path):
    ledger = tmp_path / "retrains.json"
    ledger.write_text("{not json")
    with pytest.raises(retrains.RetrainLedgerError, match="sluicegate retrain-reset"):
        retrains.blocked_streak(ledger)
    retrains.reset(ledger, "ops")
    assert retrains.blocked_streak(ledger).count == 0
    assert list(tmp_path.glob("retrains.unreadable-*.json"))  # the broken file is kept aside


def test_the_pipeline_result_maps_to_an_outcome(home):
    from sluicegate.config import Settings

    settings = Settings()
    blocked = {"status": "blocked_model", "version": "3", "reason": "min_pr_auc: 0.1 < 0.3", "batch": "w1"}
    assert retrains.record_retrain(settings, blocked, "scheduled", "run-1").count == 1
    data = {"status": "blocked_data", "reason": "Batch w2 failed 1 of 30 checks", "batch": "w2"}
    streak = retrains.record_retrain(settings, data, "triggered")
    assert streak.count == 2 and streak.last_reason.startswith("validation: Batch w2")
    for status in ("unchanged", "registered", "lost_race"):  # not a verdict of the gates: streak untouched
        assert retrains.record_retrain(settings, {"status": status, "reason": "-"}, "scheduled") is None
    assert retrains.blocked_streak(retrains.ledger_path(settings)).count == 2
    assert retrains.ledger_path(settings) == settings.paths.monitoring / "retrains.json"
    assert retrains.history(retrains.ledger_path(settings))[0]["flow_run_id"] == "run-1"


def test_the_cli_shows_the_streak_and_resets_it(home):
    from typer.testing import CliRunner

    from sluicegate.cli import app
    from sluicegate.config import Settings

    ledger = retrains.ledger_path(Settings())
    retrains.record_outcome(ledger, "blocked", "2", "blocked")
    result = CliRunner().invoke(app, ["retrain-reset", "--actor", "bob", "--reason", "fixed the feed"])
    assert result.exit_code == 0, result.output
    assert "cleared a streak of 1 blocked retrain" in result.output
    assert retrains.blocked_streak(ledger).count == 0 and retrains.history(ledger)[-1]["actor"] == "bob"


# --- the monitor's trigger -------------------------------------------------------------------------

class FakeTrigger:
    name = "training-pipeline/training-pipeline"

    def __init__(self):
        self.fired = []

    def active_runs(self) -> int:
        return 0

    def fire(self, decision) -> str:
        self.fired.append(decision)
        return f"run-{len(self.fired)}"


def _drifting() -> m.DriftReport:
    col = m.ColumnDrift("amount", "numeric", 0.4, None, "drift")
    return m.DriftReport(rows=1_000, since=None, until=None, model_versions=["3"], reference_version="3",
                         columns=[col], score=None)


def test_the_monitor_stops_triggering_after_max_blocked_retrains_in_a_row(tmp_path):
    ledger = tmp_path / "retrains.json"
    trigger = FakeTrigger()
    for v in ("4", "5"):
        retrains.record_outcome(ledger, "blocked", v, f"min_pr_auc: v{v} too weak")
    decision, run_id = operate._decide_and_trigger(_drifting(), T, m.MonitorState(), trigger, ledger)
    assert decision.fire and run_id == "run-1"  # two blocked: below the limit of three

    retrains.record_outcome(ledger, "blocked", "6", "min_pr_auc: 0.12 < 0.3")
    decision, run_id = operate._decide_and_trigger(_drifting(), T, m.MonitorState(), trigger, ledger)
    assert not decision.fire and run_id is None and len(trigger.fired) == 1
    assert decision.suppressed.startswith("3 retrains in a row were blocked by gates (last: min_pr_auc: 0.12 < 0.3)")
    assert "sluicegate retrain-reset" in decision.suppressed
    assert "suppressed: 3 retrains in a row" in decision.summary()

    retrains.reset(ledger, "ops")
    decision, run_id = operate._decide_and_trigger(_drifting(), T, m.MonitorState(), trigger, ledger)
    assert decision.fire and run_id == "run-2"


def test_no_limit_with_zero_and_an_unreadable_ledger_suppresses_saying_why(tmp_path):
    ledger = tmp_path / "retrains.json"
    for v in range(5):
        retrains.record_outcome(ledger, "blocked", str(v), "blocked")
    unlimited = T.model_copy(update={"max_blocked_retrains": 0})
    assert operate._decide_and_trigger(_drifting(), unlimited, m.MonitorState(), FakeTrigger(), ledger)[0].fire
    ledger.write_text("[]")
    decision, _ = operate._decide_and_trigger(_drifting(), T, m.MonitorState(), FakeTrigger(), ledger)
    assert not decision.fire and "unreadable" in decision.suppressed


def test_max_blocked_retrains_is_read_from_the_drift_block_with_a_default_of_three(tmp_path):
    from sluicegate.policy import GatePolicyError, load_policy

    assert DriftThresholds().max_blocked_retrains == 3
    assert load_policy(REPO / "gates.yaml").drift.max_blocked_retrains == 3
    base = re.sub(r"(?ms)^drift:.*?(?=^\S|\Z)", "", (REPO / "gates.yaml").read_text())
    gates = tmp_path / "gates.yaml"
    gates.write_text(base + "drift:\n  max_blocked_retrains: 5\n")
    assert load_policy(gates).drift.max_blocked_retrains == 5
    gates.write_text(base + "drift:\n  max_blocked_retrains: -1\n")
    with pytest.raises(GatePolicyError, match="max_blocked_retrains"):
        load_policy(gates)


def test_streak_summary_reads_well():
    assert "no blocked retrain" in retrains.Streak().summary()
    text = retrains.Streak(2, "max_ece: 0.04 > 0.02", "9", datetime.now(UTC).isoformat()).summary()
    assert text == "2 retrain(s) in a row blocked by gates (last v9: max_ece: 0.04 > 0.02)"
