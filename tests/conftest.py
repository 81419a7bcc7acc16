"""Shared fixtures: every test gets its own SLUICEGATE_HOME."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluicegate.spec import DatasetSpec, load_spec

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def spec() -> DatasetSpec:
    return load_spec()


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh SLUICEGATE_HOME, with the repo's gates.yaml."""
    home = tmp_path / "home"
    monkeypatch.setenv("SLUICEGATE_HOME", str(home))
    monkeypatch.setenv("SLUICEGATE_GATES_PATH", str(REPO / "gates.yaml"))
    return home
