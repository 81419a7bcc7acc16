"""Synthetic card-transaction batches: the default example table, with drift and faults to inject.

The generator plants fraud the way it happens: short bursts on a compromised
card (velocity), amounts far above the customer's usual, risky merchants and
night hours, with legitimate look-alikes so that no single signal is perfect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

from sluicegate.spec import DatasetSpec

Drift = Literal["none", "amount", "category", "country"]
Fault = Literal["none", "nulls", "out_of_range", "drop_column", "rename_column",
                "bad_dtype", "duplicates", "label_flip"]
DRIFTS: tuple[str, ...] = Drift.__args__
FAULTS: tuple[str, ...] = Fault.__args__

# The example table's own columns (the default spec, dataset.yaml, declares them).
CUSTOMER, MERCHANT, AMOUNT = "customer_id", "merchant_id", "amount"

FRAUD_SHARE = 0.02  # fraction of rows planted as fraud episodes
NIGHT_HOURS = np.array([0, 1, 2, 3, 4, 5])
# Relative activity per hour of day for legitimate spending.
DAY_PROFILE = np.array([1, 0.6, 0.4, 0.3, 0.3, 0.5, 1.5, 3, 4, 4, 4.5, 5,
                        6, 5.5, 5, 5, 5.5, 6, 6.5, 6, 5, 4, 3, 2], dtype=float)


@dataclass(frozen=True)
class GenerateConfig:
    rows: int = 200_000
    days: int = 30
    seed: int = 7
    start: str = "2026-10-01"
    drift: Drift = "none"
    fault: Fault = "none"

    @property
    def batch_id(self) -> str:
        parts = [self.start, f"{self.days}d", f"{self.rows}r", f"s{self.seed}"]
        if self.drift != "none":
            parts.append(f"drift-{self.drift}")
        if self.fault != "none":
            parts.append(f"fault-{self.fault}")
        return "_".join(parts)


def generate_transactions(cfg: GenerateConfig, spec: DatasetSpec) -> pd.DataFrame:
    """Return a batch of transactions with the spec's columns, sorted by time."""
    if cfg.rows < 100 or cfg.days < 1:
        raise ValueError(f"need at least 100 rows and 1 day, got rows={cfg.rows} days={cfg.days}")
    rng = np.random.default_rng(cfg.seed)
    cats = {c: np.array(spec.categories(c)) for c in spec.categorical_features}
    countries, channels = cats["country"], cats["channel"]
    devices, mcc = cats["device"], cats["merchant_category"]

    n_cust = max(50, cfg.rows // 40)
    n_merch = max(20, cfg.rows // 200)
    # Customers: a home country, a usual spend level, an activity level.
    country_w = _weights(len(countries), rng, skew=1.2)
    if cfg.drift == "country":
        country_w = np.roll(country_w, 3)
    cust_country = rng.choice(len(countries), n_cust, p=country_w)
    cust_usual = rng.lognormal(3.4, 0.7, n_cust)
    cust_activity = rng.pareto(2.0, n_cust) + 1
    cust_activity /= cust_activity.sum()
    cust_device = rng.choice(len(devices), n_cust, p=[0.1, 0.3, 0.3, 0.3])
    # Merchants: a category and a hidden risk level; a few are very risky.
    mcc_w = _weights(len(mcc), rng, skew=0.8)
    if cfg.drift == "category":
        mcc_w = np.roll(mcc_w, 4)
    merch_cat = rng.choice(len(mcc), n_merch, p=mcc_w)
    merch_risk = rng.beta(0.6, 8, n_merch)
    risky_merchants = np.argsort(-merch_risk)[: max(3, n_merch // 12)]

    n_fraud_target = int(cfg.rows * FRAUD_SHARE)
    legit = _legit_rows(cfg.rows - n_fraud_target, cfg.days, rng, cust_activity, cust_usual,
                        cust_country, cust_device, n_merch)
    fraud = _fraud_rows(n_fraud_target, cfg.days, rng, cust_activity, cust_usual, cust_country,
                        cust_device, risky_merchants, n_merch, len(countries))
    df = pd.concat([pd.DataFrame(legit), pd.DataFrame(fraud)], ignore_index=True)
    df = df.iloc[: cfg.rows]
    if cfg.drift == "amount":
        df["amount"] *= 1.8

    start = pd.Timestamp(cfg.start, tz="UTC")
    ts = start + pd.to_timedelta(df.pop("seconds"), unit="s")
    cust_idx, merch_idx = df.pop("cust"), df.pop("merch")
    channel_idx = df.pop("channel_idx")
    out = pd.DataFrame({
        spec.timestamp: ts.dt.floor("s").astype("datetime64[us, UTC]"),
        CUSTOMER: cust_idx.astype("int64"),
        MERCHANT: merch_idx.astype("int64"),
        AMOUNT: np.clip(df["amount"].round(2), 0.01, 50_000.0),
        "channel": channels[channel_idx],
        "country": countries[df["country_idx"]],
        "device": devices[df["device_idx"]],
        "merchant_category": mcc[merch_cat[merch_idx]],
        spec.label: df["fraud"].astype("int64"),
    })
    out = out.sort_values([spec.timestamp, CUSTOMER], kind="stable").reset_index(drop=True)
    out.insert(0, spec.id, [f"{cfg.batch_id}-{i:07d}" for i in range(len(out))])
    _legit_noise_labels(out, spec, rng, merch_risk)
    return out[spec.column_names]


def _weights(n: int, rng: np.random.Generator, skew: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** skew
    return w / w.sum()


def _legit_rows(n, days, rng, activity, usual, country, device, n_merch) -> dict:
    cust = rng.choice(len(activity), n, p=activity)
    day = rng.integers(0, days, n)
    hour = rng.choice(24, n, p=DAY_PROFILE / DAY_PROFILE.sum())
    seconds = day * 86400 + hour * 3600 + rng.integers(0, 3600, n)
    # A tenth of legitimate spending comes in quick runs too (a shopping trip).
    runs = rng.random(n) < 0.1
    seconds[runs] = seconds[np.roll(np.flatnonzero(runs), 1)] + rng.integers(30, 1800, runs.sum())
    cust[runs] = cust[np.roll(np.flatnonzero(runs), 1)]
    travelling = rng.random(n) < 0.03
    return {
        "seconds": np.minimum(seconds, days * 86400 - 1),
        "cust": cust,
        "merch": rng.integers(0, n_merch, n),
        "amount": usual[cust] * rng.lognormal(0, 0.45, n),
        "channel_idx": rng.choice(4, n, p=[0.5, 0.25, 0.2, 0.05]),
        "country_idx": np.where(travelling, rng.integers(0, 12, n), country[cust]),
        "device_idx": np.where(rng.random(n) < 0.8, device[cust], rng.integers(0, 4, n)),
        "fraud": np.zeros(n, dtype=np.int64),
    }


def _fraud_rows(n, days, rng, activity, usual, country, device, risky, n_merch, n_countries) -> dict:
    """Bursts of 1 to 6 transactions on a compromised card within minutes."""
    sizes = rng.integers(1, 7, n)
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), n) + 1]
    sizes[-1] -= sizes.sum() - n
    sizes = sizes[sizes > 0]
    n_ep = len(sizes)
    ep = np.repeat(np.arange(n_ep), sizes)
    victim = rng.choice(len(activity), n_ep, p=activity)[ep]
    night = rng.random(n_ep) < 0.55
    hour = np.where(night, rng.choice(NIGHT_HOURS, n_ep), rng.integers(0, 24, n_ep))
    start = rng.integers(0, days, n_ep) * 86400 + hour * 3600 + rng.integers(0, 3600, n_ep)
    seconds = start[ep] + rng.integers(0, 1800, n)
    at_risky = rng.random(n) < 0.6
    foreign = (rng.random(n_ep) < 0.45)[ep]
    return {
        "seconds": np.minimum(seconds, days * 86400 - 1),
        "cust": victim,
        "merch": np.where(at_risky, rng.choice(risky, n), rng.integers(0, n_merch, n)),
        "amount": usual[victim] * rng.lognormal(1.1, 0.8, n),
        "channel_idx": rng.choice(4, n, p=[0.15, 0.45, 0.3, 0.1]),
        "country_idx": np.where(foreign, rng.integers(0, n_countries, n), country[victim]),
        "device_idx": np.where(rng.random(n) < 0.5, device[victim], rng.integers(0, 4, n)),
        # Not every transaction in a burst is reported as fraud.
        "fraud": (rng.random(n) < 0.9).astype(np.int64),
    }


def _legit_noise_labels(df: pd.DataFrame, spec: DatasetSpec, rng, merch_risk) -> None:
    """A little fraud that looks ordinary, more of it at risky merchants."""
    p = 0.002 + 0.03 * merch_risk[df[MERCHANT].to_numpy()]
    df.loc[rng.random(len(df)) < p, spec.label] = 1


def inject_fault(df: pd.DataFrame, fault: Fault, spec: DatasetSpec, seed: int) -> pd.DataFrame:
    """Return a copy of the batch broken in one of the ways real feeds break."""
    rng = np.random.default_rng(seed + 1)
    df = df.copy()
    n = len(df)
    pick = rng.random(n)
    if fault == "none":
        return df
    if fault == "nulls":
        df.loc[pick < 0.05, AMOUNT] = np.nan
        df.loc[pick > 0.97, "country"] = None
    elif fault == "out_of_range":
        df.loc[pick < 0.02, AMOUNT] = -df.loc[pick < 0.02, AMOUNT]
        df.loc[pick > 0.99, AMOUNT] = 1e7
    elif fault == "drop_column":
        df = df.drop(columns=["device"])
    elif fault == "rename_column":
        df = df.rename(columns={AMOUNT: f"{AMOUNT}_usd"})
    elif fault == "bad_dtype":
        df[AMOUNT] = df[AMOUNT].map(lambda v: f"{v:.2f} USD")
    elif fault == "duplicates":
        df = pd.concat([df, df[pick < 0.05]]).sort_values(spec.timestamp, kind="stable")
    elif fault == "label_flip":
        df.loc[pick < 0.05, spec.label] = 1 - df.loc[pick < 0.05, spec.label]
    else:
        raise ValueError(f"unknown fault {fault!r}; choose one of {FAULTS}")
    return df.reset_index(drop=True)
