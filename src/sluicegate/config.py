"""Run-time settings and the layout of SLUICEGATE_HOME.

All state of a local run lives under one directory; service URIs come from
environment variables with embedded defaults. Nothing is read at import time.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sluicegate.spec import DEFAULT_SPEC_PATH, DatasetSpec, load_spec

HOME_MARKER = "sluicegate-home.json"
HOME_LAYOUT_VERSION = 2  # 2: one folder per table (spec) beside the shared MLflow store
SQLITE_HEADER = b"SQLite format 3\x00"


class CorruptHomeError(RuntimeError):
    """SLUICEGATE_HOME exists but cannot be used as it is."""


class Settings(BaseSettings):
    """Read from SLUICEGATE_* environment variables."""

    model_config = SettingsConfigDict(env_prefix="SLUICEGATE_", extra="ignore")

    home: Path = Path(".sluicegate")
    spec_path: Path = DEFAULT_SPEC_PATH
    # None: the spec's own `gates` file (relative to the spec), else gates.yaml
    gates_path: Path | None = None
    # None: the spec's model_name (or its name); set to register and serve under another name.
    model_name: str | None = None
    # None means MLflow on SQLite under home.
    mlflow_tracking_uri: str | None = None
    # None: the online state (and Feast's online store) in SQLite under home; else a Redis connection
    # string in Feast's form (host:port,password=...).
    feast_redis: str | None = None
    # A Dask distributed scheduler to run batch work on (sluicegate.compute); None: in this process.
    dask_scheduler: str | None = None
    # Rows per shard of an entity's events in the feature stage (features.aggregates): a shard's sort and
    # windows cost O(s log s), so the cost per row stays flat past this; shards are what a cluster runs.
    feature_shard_rows: int = Field(1_000_000, ge=1000)
    # DuckDB's memory for one point-in-time join of the feature stage; past it the join spills to disk
    # under home. At 10M rows, the row view's join: 1.8 GB over what is held and 10.5 s at 1GB, 2.3 GB
    # and 10.7 s at 2GB, 4.4 GB and 7.1 s unbounded; the customer view's: 1.5 GB and 6.4 s at 1GB.
    feature_join_memory: str = "1GB"
    # Test rows the serving-parity check replays through the online path (the window's last ones): a
    # replay scores each event in Python (docs/serving.md has its cost per event).
    serving_parity_rows: int = Field(20_000, ge=100)
    experiment: str = "sluicegate"
    # Where the model will run (a target of hardware.yaml: cpu, cuda, tensorrt, rocm): the one setting the
    # pipeline, `deploy` and the server read. None: the profile's target, else cpu.
    target: str | None = None
    # Row of hardware.yaml priced for cost per 1M predictions; it names its target, so giving both means
    # they must agree. None: the target's own profile. Price overridable.
    hardware_profile: str | None = None
    price_per_hour: float | None = None

    @model_validator(mode="after")
    def _defaults_from_spec(self) -> Settings:
        if self.model_name is None:
            self.model_name = self.spec.registered_model
        if self.gates_path is None:
            own = self.spec.gates
            self.gates_path = Path(self.spec_path).parent / own if own else Path("gates.yaml")
        return self

    @property
    def spec(self) -> DatasetSpec:
        return load_spec(self.spec_path)

    @property
    def paths(self) -> HomePaths:
        return HomePaths(self.home.resolve(), self.spec.name)

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.paths.mlflow_db}"


@dataclass(frozen=True)
class HomePaths:
    """The MLflow store and the locks are shared; everything a table owns is under its spec's name."""

    root: Path
    table: str  # the spec's name

    @property
    def tables(self) -> Path:
        return self.root / "tables"

    @property
    def own(self) -> Path:
        return self.tables / self.table

    @property
    def raw(self) -> Path:
        return self.own / "raw"

    @property
    def quarantine(self) -> Path:
        return self.own / "quarantine"

    @property
    def features(self) -> Path:
        return self.own / "features"

    @property
    def feast(self) -> Path:
        return self.own / "feast"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def runs(self) -> Path:
        return self.own / "runs"

    @property
    def predictions(self) -> Path:
        return self.own / "predictions"

    @property
    def model_repository(self) -> Path:
        return self.own / "model_repository"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    @property
    def pii_key(self) -> Path:
        """The home's secret key for hashing personal data (`serve.privacy`): one for every table."""
        return self.root / "pii.key"

    @property
    def monitoring(self) -> Path:
        return self.own / "monitoring"

    @property
    def labels(self) -> Path:
        return self.own / "labels"


def ensure_home(paths: HomePaths) -> HomePaths:
    """Create SLUICEGATE_HOME if missing; refuse one that is corrupt, saying what to do."""
    root = paths.root
    if root.exists() and not root.is_dir():
        raise CorruptHomeError(
            f"SLUICEGATE_HOME={root} is a file, not a directory. "
            "Move it away or point SLUICEGATE_HOME at a directory."
        )
    marker = root / HOME_MARKER
    if marker.exists():
        try:
            version = json.loads(marker.read_text())["layout_version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptHomeError(
                f"{marker} is unreadable ({exc}). SLUICEGATE_HOME is corrupt: "
                f"delete {root} to start afresh (it only holds run-time state)."
            ) from exc
        if version != HOME_LAYOUT_VERSION:
            raise CorruptHomeError(
                f"{root} has layout version {version}, this Sluicegate uses "
                f"{HOME_LAYOUT_VERSION}. Delete {root} or point SLUICEGATE_HOME elsewhere."
            )
    if paths.mlflow_db.exists() and paths.mlflow_db.stat().st_size > 0:
        with open(paths.mlflow_db, "rb") as f:
            if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                raise CorruptHomeError(
                    f"{paths.mlflow_db} is not an SQLite database. SLUICEGATE_HOME is "
                    f"corrupt: delete {root} to start afresh."
                )
    for folder in (paths.raw, paths.quarantine, paths.features, paths.feast,
                   paths.mlflow_artifacts, paths.runs, paths.predictions):
        folder.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(json.dumps({"layout_version": HOME_LAYOUT_VERSION}))
    return paths


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock held on `path` between processes on this machine (fcntl)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
