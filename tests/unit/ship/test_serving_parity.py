"""The serving-parity check on a table with other types than the example's: a sound serving path passes
with every feature equal; a broken one (an injected fault), or a Python feature that reads the whole
frame, is blocked by `max_serving_skew` with the feature named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sluicegate.config import Settings
from sluicegate.features import online
from sluicegate.policy import load_policy
from sluicegate.ship import serving_parity
from sluicegate.ship.gates import decide
from sluicegate.train.stages import prepare
from tests.unit.features.test_online import offline, orders, orders_spec
from tests.unit.ship.test_gates import evidence

REPO_GATES = Path(__file__).resolve().parents[3] / "gates.yaml"


def share_of_day(frame, spec):  # reads the whole frame: a batch of 64 requests gives other values
    return pd.DataFrame({"spend_rank": frame["spend"].rank(pct=True).fillna(0.5)})


def _spec(python: bool = False):
    return orders_spec(python={"function": f"{__name__}:share_of_day", "outputs": ["spend_rank"]}) if python \
        else orders_spec()


def _prepared(spec):
    rows = orders(3000, seed=5)
    frame = pd.concat([rows, offline(rows, spec)], axis=1)
    if spec.features.python:
        frame["spend_rank"] = share_of_day(frame, spec)["spend_rank"]
    return prepare(frame, spec)


def _score(data):
    return 1.0 / (1.0 + np.exp(-np.nan_to_num(data.numeric).sum(axis=1) / 10.0))


@pytest.fixture
def settings(tmp_path):
    return Settings(home=tmp_path)


def test_a_sound_serving_path_has_every_feature_equal_and_passes(settings):
    spec = _spec()
    parity = serving_parity.serving_parity_stage(settings, spec, _prepared(spec), _score, max_rows=400)
    assert parity.rows == 400 and parity.skew == 0.0
    assert parity.served_pr_auc == pytest.approx(parity.offline_pr_auc)
    assert "every feature equal on all 400 replayed test rows" in parity.detail()
    decision = decide(load_policy(REPO_GATES), evidence(serving_skew=parity.skew, serving_detail=parity.detail()))
    assert "max_serving_skew" not in [r.gate for r in decision.failed]


def test_a_broken_serving_path_is_blocked_naming_the_feature(settings, monkeypatch):
    spec = _spec()
    right = online.aggregate_at

    def stale(agg, t, *args):  # injected fault: the card's 1h count served as of an hour earlier
        return right(agg, t - 3600 * 10**9 if agg.feature_name == "card_n_1h" else t, *args)

    monkeypatch.setattr(online, "aggregate_at", stale)
    parity = serving_parity.serving_parity_stage(settings, spec, _prepared(spec), _score, max_rows=400)
    assert parity.worst.name == "card_n_1h" and parity.skew > 0.1
    assert [f.name for f in parity.features if f.differing] == ["card_n_1h"]
    decision = decide(load_policy(REPO_GATES), evidence(serving_skew=parity.skew, serving_detail=parity.detail()))
    blocked = [r for r in decision.failed if r.gate == "max_serving_skew"]
    assert blocked and "card_n_1h differs on" in blocked[0].detail and "PR-AUC served" in blocked[0].detail


def test_a_python_feature_that_reads_the_whole_frame_is_blocked_by_name(settings):
    spec = _spec(python=True)
    parity = serving_parity.serving_parity_stage(settings, spec, _prepared(spec), _score, max_rows=400)
    assert parity.worst.name == "spend_rank" and parity.skew > 0.5
    assert all(f.differing == 0 for f in parity.features if f.name != "spend_rank")
