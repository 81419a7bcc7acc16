"""The serving-parity check: the candidate's test window replayed through the serving feature path and
compared row by row with the offline features it was evaluated on.

The replay is the server's own path (`features.online`: a state as of the window's start, events in
time order and in micro-batches, labels arriving as they become known, the spec's Python features
computed per micro-batch as `/predict` computes them), on a private state file, never the live one.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sluicegate.config import Settings
from sluicegate.data.batches import read_history
from sluicegate.features import aggregates, online
from sluicegate.features.inputs import build_model_input, python_features
from sluicegate.ship.evaluate import average_precision
from sluicegate.spec import DatasetSpec
from sluicegate.train.stages import Prepared

# A served value equal to the offline one within float64 rounding of a different summation order.
RTOL, ATOL = 1e-6, 1e-9


@dataclass
class FeatureSkew:
    name: str
    differing: float  # share of replayed rows whose served value differs from the offline one
    largest_gap: float  # largest |served - offline| (inf where one is missing and the other is not)


@dataclass
class ServingParity:
    rows: int  # test rows replayed (0: the spec has no online features)
    features: list[FeatureSkew] = field(default_factory=list)
    served_pr_auc: float = float("nan")
    offline_pr_auc: float = float("nan")
    seconds: float = 0.0

    @property
    def worst(self) -> FeatureSkew | None:
        return max(self.features, key=lambda f: f.differing, default=None)

    @property
    def skew(self) -> float:
        """The largest share of rows any feature differs on: what `max_serving_skew` bounds."""
        return self.worst.differing if self.worst else 0.0

    def detail(self) -> str:
        if not self.rows:
            return "no online features: /predict serves the request's own columns"
        skewed = [f for f in sorted(self.features, key=lambda f: -f.differing) if f.differing > 0]
        where = (f"every feature equal on all {self.rows:,} replayed test rows" if not skewed else
                 "; ".join(f"{f.name} differs on {f.differing:.2%} of {self.rows:,} rows (largest gap "
                           f"{f.largest_gap:.4g})" for f in skewed))
        return f"{where}; PR-AUC served {self.served_pr_auc:.4f} vs offline {self.offline_pr_auc:.4f}"

    def summary(self) -> str:
        return f"serving parity: {self.detail()} in {self.seconds:.1f}s"

    def to_dict(self) -> dict:
        return {"rows": self.rows, "skew": self.skew, "detail": self.detail(), "served_pr_auc": self.served_pr_auc,
                "offline_pr_auc": self.offline_pr_auc, "features": [asdict(f) for f in self.features]}


def serving_parity_stage(settings: Settings, spec: DatasetSpec, prepared: Prepared, score, max_rows: int
                         ) -> ServingParity:
    """Replay the last `max_rows` rows of the test window through the serving path; `score(ModelInput)`
    is the shipped variant. Earlier rows (the rest of the batch, and raw history before it within the
    longest window) make the state the replay starts from."""
    started = time.perf_counter()
    online_names = [a.feature_name for a in spec.features.aggregates]
    python_names = list(spec.features.python.outputs) if spec.features.python else []
    if not online_names and not python_names:
        return ServingParity(rows=0, seconds=time.perf_counter() - started)
    test = prepared.splits.rows("test")
    if spec.timestamp:
        test = test.sort_values(spec.timestamp, kind="stable")
    replayed = test.iloc[-max_rows:]
    served = _served_columns(settings, spec, prepared, replayed) if online_names else replayed.copy()
    if python_names:  # per micro-batch, as /predict computes them
        parts = [python_features(served.iloc[i:i + online.REPLAY_BATCH], spec)
                 for i in range(0, len(served), online.REPLAY_BATCH)]
        served[python_names] = pd.concat(parts)
    y = spec.positive(replayed[spec.label]).to_numpy()
    return ServingParity(
        rows=len(replayed), features=[feature_skew(n, served[n], replayed[n]) for n in online_names + python_names],
        served_pr_auc=average_precision(y, score(build_model_input(served, spec))),
        offline_pr_auc=average_precision(y, score(build_model_input(replayed, spec))),
        seconds=time.perf_counter() - started)


def _served_columns(settings: Settings, spec: DatasetSpec, prepared: Prepared, replayed: pd.DataFrame) -> pd.DataFrame:
    """The replayed rows with their aggregates as the serving path gives them."""
    start = replayed[spec.timestamp].min()
    since = start - aggregates.history_reach(spec)
    columns = [c for c in [spec.id, *aggregates.history_columns(spec)] if c]
    earlier = [prepared.splits.rows(part)[columns] for part in ("train", "valid", "test")]
    earlier = pd.concat(earlier, ignore_index=True)
    earlier = earlier[(earlier[spec.timestamp] >= since) & (earlier[spec.timestamp] < start)]
    first = min(prepared.splits.rows(part)[spec.timestamp].min() for part in ("train", "valid", "test"))
    history = read_history(settings.paths.raw, spec.timestamp, pd.Timestamp(since), pd.Timestamp(first),
                           aggregates.history_columns(spec))
    prior = pd.concat([history, earlier], ignore_index=True) if len(history) else earlier
    with tempfile.TemporaryDirectory(prefix="serving-parity-") as folder:
        width = len(online.value_columns(spec))
        state = online.SqliteEventState(Path(folder) / "events.db", width)
        try:
            found = online.replay(spec, prior, replayed, state)
        finally:
            state.close()
    served = replayed.copy()
    for name in found.columns:
        served[name] = found[name].to_numpy()
    return served


def feature_skew(name: str, served: pd.Series, offline: pd.Series) -> FeatureSkew:
    """Share of rows the served value differs from the offline one on (missing on both: equal), and the
    largest gap (inf where one side is missing)."""
    a = pd.to_numeric(served, errors="coerce").to_numpy(np.float64)
    b = pd.to_numeric(offline, errors="coerce").to_numpy(np.float64)
    both_missing = np.isnan(a) & np.isnan(b)
    same = both_missing | np.isclose(a, b, rtol=RTOL, atol=ATOL)
    gaps = np.where(np.isnan(a) ^ np.isnan(b), np.inf, np.abs(a - b))
    gaps = gaps[~both_missing]
    return FeatureSkew(name, float(np.mean(~same)) if len(same) else 0.0,
                       float(gaps.max()) if len(gaps) else 0.0)
