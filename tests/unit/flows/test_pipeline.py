"""The training pipeline's own bookkeeping: seconds and peak memory per stage."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from sluicegate import compute
from sluicegate.flows.pipeline import _Stopwatch


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's high-water mark is Linux's")
def test_each_stage_gets_its_own_peak_memory():
    clock = _Stopwatch()
    block = np.ones(50_000_000)  # 400 MB, touched
    del block
    clock.lap("big")
    clock.lap("small")
    assert clock.peak_gb["big"] - clock.peak_gb["small"] > 0.3
    assert list(clock.seconds) == list(clock.peak_gb) == ["big", "small"]
    assert compute.peak_rss_gb() < clock.peak_gb["big"]
