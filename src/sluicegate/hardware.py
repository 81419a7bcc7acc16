"""Target hardware: the execution provider a target runs on and what an hour of it costs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from sluicegate.config import Settings

HARDWARE_PATH = Path(__file__).with_name("hardware.yaml")


@dataclass
class Hardware:
    target: str
    provider: str
    profile: str
    price_per_hour: float


def hardware(settings: Settings) -> Hardware:
    """The target's execution provider and the profile's price per hour (overridable)."""
    table = yaml.safe_load(HARDWARE_PATH.read_text())
    if settings.target not in table["targets"]:
        raise ValueError(f"unknown target {settings.target!r}; choose one of {sorted(table['targets'])}")
    if settings.hardware_profile not in table["profiles"]:
        raise ValueError(f"unknown hardware profile {settings.hardware_profile!r}; "
                         f"choose one of {sorted(table['profiles'])} in {HARDWARE_PATH}")
    price = settings.price_per_hour or table["profiles"][settings.hardware_profile]["price_per_hour"]
    return Hardware(settings.target, table["targets"][settings.target], settings.hardware_profile, price)
