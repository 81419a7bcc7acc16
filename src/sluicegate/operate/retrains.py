"""The retrain ledger: how each automatic retrain ended, so that the monitor stops starting retrains
after `max_blocked_retrains` (gates.yaml `drift:`) of them in a row were blocked by a gate.

An automatic retrain is a `scheduled-retrain` run or a `training-pipeline` run the monitor started.
Each one that reached a gate is recorded as `promoted` or `blocked` (by validation or by the model
gates); a promotion ends the streak, and so does an operator's reset:

    sluicegate retrain-reset [--actor NAME] [--reason TEXT] [--spec SPEC]
    sluicegate status --json       # "blocked_retrains": the streak

A JSON file, `SLUICEGATE_HOME/tables/<spec>/monitoring/retrains.json`; every change is made under a
file lock and written whole (a reader never sees half a file).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from sluicegate.config import Settings, file_lock

LEDGER = "retrains.json"
KEEP = 200  # events kept for the record; the streak itself is counted exactly, past that too
RESET_HINT = "run `sluicegate retrain-reset` to allow more"

Outcome = Literal["promoted", "blocked"]
BLOCKED_STATUSES = ("blocked_data", "blocked_model")


class RetrainLedgerError(ValueError):
    """The ledger file exists but cannot be read."""


@dataclass(frozen=True)
class Streak:
    """Automatic retrains blocked in a row since the last promotion or reset."""

    count: int = 0
    last_reason: str | None = None
    last_version: str | None = None
    last_at: str | None = None

    def summary(self) -> str:
        if not self.count:
            return "no blocked retrain since the last promotion or reset"
        version = f" v{self.last_version}" if self.last_version else ""
        return f"{self.count} retrain(s) in a row blocked by gates (last{version}: {self.last_reason})"


def ledger_path(settings: Settings) -> Path:
    return settings.paths.monitoring / LEDGER


def blocked_streak(path: Path) -> Streak:
    """The current streak of blocked retrains (0 when the ledger does not exist yet)."""
    return Streak(**_load(path)["streak"])


def record_outcome(path: Path, outcome: Outcome, version: str | None, reason: str, *, kind: str | None = None,
                   batch: str | None = None, flow_run_id: str | None = None) -> Streak:
    """Record how a retrain ended; returns the streak after it."""
    if outcome not in ("promoted", "blocked"):
        raise ValueError(f"a retrain outcome is 'promoted' or 'blocked', not {outcome!r}")
    event = {"event": outcome, "at": _now(), "version": None if version is None else str(version),
             "reason": reason, "kind": kind, "batch": batch, "flow_run_id": flow_run_id}
    with _locked(path) as ledger:
        ledger["events"].append(event)
        if outcome == "blocked":
            count = ledger["streak"]["count"] + 1
            ledger["streak"] = asdict(Streak(count, reason, event["version"], event["at"]))
        else:
            ledger["streak"] = asdict(Streak())
        return Streak(**ledger["streak"])


def reset(path: Path, actor: str, reason: str = "reset by an operator") -> Streak:
    """Clear the streak so the monitor may trigger again; returns the streak that was cleared.
    Works on an unreadable ledger too (it is rewritten, the old file kept beside it)."""
    try:
        cleared = blocked_streak(path)
    except RetrainLedgerError:
        path.replace(path.with_suffix(f".unreadable-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"))
        cleared = Streak()
    with _locked(path) as ledger:
        ledger["events"].append({"event": "reset", "at": _now(), "actor": actor, "reason": reason,
                                 "cleared": cleared.count})
        ledger["streak"] = asdict(Streak())
    return cleared


def record_retrain(settings: Settings, result: dict, kind: str, flow_run_id: str | None = None) -> Streak | None:
    """The training pipeline's result as a retrain outcome. Promoted and blocked (validation or model
    gates) are outcomes of the gates; any other status (unchanged, registered without gating, a lost
    race) leaves the streak as it is and returns None."""
    status = result.get("status")
    if status == "promoted":
        outcome: Outcome = "promoted"
    elif status in BLOCKED_STATUSES:
        outcome = "blocked"
    else:
        return None
    reason = result.get("reason") or status
    if status == "blocked_data":
        reason = f"validation: {reason}"
    return record_outcome(ledger_path(settings), outcome, result.get("version"), reason, kind=kind,
                          batch=result.get("batch"), flow_run_id=flow_run_id)


def history(path: Path) -> list[dict]:
    return list(_load(path)["events"])


# --- the file ----------------------------------------------------------------------------------------

def _empty() -> dict:
    return {"streak": asdict(Streak()), "events": []}


def _load(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return _empty()
    if not text.strip():
        return _empty()
    try:
        ledger = json.loads(text)
        Streak(**ledger["streak"])
        if not isinstance(ledger["events"], list):
            raise TypeError("events is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise RetrainLedgerError(f"{path} is unreadable ({exc}); "
                                 "`sluicegate retrain-reset` rewrites it") from None
    return ledger


@contextmanager
def _locked(path: Path) -> Iterator[dict]:
    """Read, change and write the ledger under its lock; nothing is written when the change raises."""
    with file_lock(path.with_suffix(".lock")):
        ledger = _load(path)
        yield ledger
        ledger["events"] = ledger["events"][-KEEP:]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(ledger, indent=2) + "\n")
        tmp.replace(path)


def _now() -> str:
    return datetime.now(UTC).isoformat()
