"""The dataset spec: one declarative file per table, the single source every stage reads.

It names the table's id, timestamp and label (with its positive value), its columns with types,
ranges, null shares and categories, its entities, the features (raw, timestamp-derived,
point-in-time aggregates per entity, an optional Python function for the rest), the slices and
the behaviour checks. Validation, the Feast objects, the model-input builder, the ONNX tensor
contract, `/predict`'s schema, the monitor's bins and the model card are all derived from it.
`docs/own-table.md` documents every key.
"""

from __future__ import annotations

import importlib
import re
from functools import cache, cached_property
from pathlib import Path
from typing import Literal

import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

DEFAULT_SPEC_PATH = Path(__file__).with_name("dataset.yaml")
SPEC_VERSION = 1

DType = Literal["string", "int64", "float64", "bool", "timestamp"]
Transform = Literal["none", "log1p"]
Aggregation = Literal["count", "sum", "mean", "std", "min", "max", "time_since_previous", "label_rate"]
TimePart = Literal["hour_of_day", "day_of_week"]
NAME = re.compile(r"[a-z][a-z0-9_-]{0,62}")
# The row id `sluicegate import` derives (a hash of the row) when the table declares none.
DERIVED_ID = "row_id"
# Aggregations whose value is never missing (no history is 0); the others are NaN without history.
NEVER_MISSING = ("count", "sum")


class SpecError(ValueError):
    """A spec file that cannot be used, with the offending key and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Column(_Strict):
    dtype: DType
    nullable: bool = Field(False, description="May hold nulls (in any share)")
    max_null_share: float | None = Field(None, ge=0, le=1, description="Nulls allowed up to this share of rows")
    min: float | None = None
    max: float | None = None
    categories: list[str | int | bool] | None = None
    pii: bool = Field(False, description="Personal data: the prediction log stores it hashed")

    @property
    def may_be_null(self) -> bool:
        return self.nullable or bool(self.max_null_share)

    def category_list(self) -> list:
        if self.categories is not None:
            return list(self.categories)
        return [False, True] if self.dtype == "bool" else []


class Table(_Strict):
    id: str | None = Field(None, description="Unique row id; absent: import derives one")
    timestamp: str | None = Field(None, description="Event time; absent: a seeded random split, no aggregates")
    label: str
    positive: str | int | float | bool = Field(description="The label value of the positive class")
    task: str = "binary"
    label_rate: tuple[float, float] = Field((0.0, 1.0), description="Positive share a healthy batch has")
    label_delay: str = Field("0s", description="How long after an event its label is known")
    retention: str | None = Field(None, description="How long predictions and labels are kept; absent: forever")

    @field_validator("task")
    @classmethod
    def _binary_only(cls, task: str) -> str:
        if task != "binary":
            raise ValueError(f"task {task!r} is not supported yet; only 'binary' classification is")
        return task

    @field_validator("label_delay", "retention")
    @classmethod
    def _duration(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            duration(value, f"table.{info.field_name}")
        return value

    @model_validator(mode="after")
    def _retention(self) -> Table:
        # Predictions deleted before their labels can arrive could never be measured.
        if self.retention is not None and pd.Timedelta(self.retention) <= pd.Timedelta(self.label_delay):
            raise ValueError(f"table.retention: {self.retention!r} must be longer than table.label_delay "
                             f"{self.label_delay!r}, or no label would ever meet its prediction")
        return self

    @field_validator("label_rate")
    @classmethod
    def _band(cls, band: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= band[0] <= band[1] <= 1:
            raise ValueError(f"need 0 <= low <= high <= 1, got {list(band)}")
        return band


class Entity(_Strict):
    key: str = Field(description="The key column (int64 or string)")


class NumericFeature(_Strict):
    column: str
    transform: Transform = "none"


class Ratio(_Strict):
    """One numeric value against another of the same row, e.g. an amount against the entity's usual
    amount: missing when either is missing or the denominator is not positive."""

    numerator: str = Field(description="A raw numeric column or a feature")
    denominator: str = Field(description="A raw numeric column or a feature")
    name: str | None = None
    transform: Transform = "none"

    @property
    def feature_name(self) -> str:
        return self.name or f"{self.numerator}_per_{self.denominator}"


class Aggregate(_Strict):
    entity: str
    agg: Aggregation
    column: str | None = Field(None, description="The column aggregated; count, time_since_previous: none")
    window: str | None = Field(None, description="Window before the event, e.g. 1h, 7d")
    name: str | None = None
    transform: Transform | None = Field(None, description="Default: log1p for count and time_since_previous")

    @model_validator(mode="after")
    def _shape(self) -> Aggregate:
        needs_column = self.agg in ("sum", "mean", "std", "min", "max")
        if needs_column and self.column is None:
            raise ValueError(f"agg {self.agg!r} needs a 'column'")
        if not needs_column and self.column is not None:
            raise ValueError(f"agg {self.agg!r} takes no 'column'")
        if self.agg != "time_since_previous" and self.window is None:
            raise ValueError(f"agg {self.agg!r} needs a 'window'")
        if self.window is not None:
            duration(self.window, "window")
        return self

    @property
    def feature_name(self) -> str:
        if self.name:
            return self.name
        parts = [self.entity, self.agg, self.column, self.window]
        return "_".join(p for p in parts if p)

    @property
    def value_transform(self) -> Transform:
        if self.transform is not None:
            return self.transform
        return "log1p" if self.agg in ("count", "time_since_previous") else "none"

    @property
    def may_be_missing(self) -> bool:
        return self.agg not in NEVER_MISSING


class PythonFeatures(_Strict):
    """The escape hatch: `function(frame, spec) -> DataFrame` returning the named columns, one row per
    input row in the same order, each computed only from that row and rows strictly before it in time."""

    function: str = Field(description="module.path:function")
    outputs: list[str] = Field(min_length=1)


class Features(_Strict):
    numeric: list[str | NumericFeature] = []
    categorical: list[str] = []
    time: list[TimePart] = []
    aggregates: list[Aggregate] = []
    ratios: list[Ratio] = []
    python: PythonFeatures | None = None

    @property
    def numeric_columns(self) -> list[NumericFeature]:
        return [NumericFeature(column=f) if isinstance(f, str) else f for f in self.numeric]


class Slices(_Strict):
    columns: list[str] = []
    bands: dict[str, list[float]] = {}


class Invariance(_Strict):
    """A small change to one raw numeric column must not move the score by more than `max_shift`."""

    column: str
    relative_change: float = Field(0.01, gt=0, lt=1)
    max_shift: float = Field(0.05, gt=0, le=1)


class Direction(_Strict):
    """Raising a model feature (or several together) must move the score only this way (the violation
    rate is gated)."""

    feature: str | list[str]
    direction: Literal["increasing", "decreasing"] = "increasing"
    step: float | None = Field(None, gt=0, description="How much each feature is raised; default: its std")

    @property
    def features(self) -> list[str]:
        return [self.feature] if isinstance(self.feature, str) else list(self.feature)


class Behaviour(_Strict):
    invariance: list[Invariance] = []
    direction: list[Direction] = []


class DatasetSpec(_Strict):
    spec_version: int
    name: str = Field(description="Lower-case id: Feast project, GX suite, folders")
    model_name: str | None = Field(None, description="Registered model name; default: the spec's name")
    predicts: str = Field("the positive class", description="What the model predicts, for the model card")
    gates: str | None = Field(None, description="The table's own gate policy, relative to the spec file")
    table: Table
    columns: dict[str, Column]
    ignore: list[str] = []
    entities: dict[str, Entity] = {}
    features: Features
    slices: Slices = Slices()
    behaviour: Behaviour = Behaviour()

    @field_validator("spec_version")
    @classmethod
    def _version(cls, version: int) -> int:
        if version != SPEC_VERSION:
            raise ValueError(f"this Sluicegate reads spec_version {SPEC_VERSION}, got {version}")
        return version

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not NAME.fullmatch(name):
            raise ValueError(f"{name!r}: use lower-case letters, digits, '_' and '-', starting with a letter")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> DatasetSpec:
        _check_references(self)
        return self

    # --- what the stages read --------------------------------------------------------------------

    @property
    def label(self) -> str:
        return self.table.label

    @property
    def id(self) -> str:
        """The row id: the table's own, or the one `sluicegate import` derives."""
        return self.table.id or DERIVED_ID

    @property
    def timestamp(self) -> str | None:
        return self.table.timestamp

    @property
    def label_rate(self) -> tuple[float, float]:
        return self.table.label_rate

    @property
    def label_delay(self) -> pd.Timedelta:
        return duration(self.table.label_delay, "table.label_delay")

    @property
    def retention(self) -> pd.Timedelta | None:
        """How long predictions and labels are kept; None: forever."""
        return None if self.table.retention is None else duration(self.table.retention, "table.retention")

    @property
    def pii_columns(self) -> list[str]:
        """Columns of personal data: the prediction log never holds their raw values."""
        return [name for name, col in self.columns.items() if col.pii]

    @property
    def registered_model(self) -> str:
        return self.model_name or self.name

    @cached_property
    def all_columns(self) -> dict[str, Column]:
        """The columns a batch holds, in order: the declared ones, after the derived row id if any
        (ignored columns included: they are still validated)."""
        derived = {} if self.table.id else {DERIVED_ID: Column(dtype="string")}
        return {**derived, **self.columns}

    @property
    def column_names(self) -> list[str]:
        return list(self.all_columns)

    @property
    def categorical_features(self) -> list[str]:
        return list(self.features.categorical)

    def categories(self, column: str) -> list:
        return self.columns[column].category_list()

    @property
    def slice_columns(self) -> list[str]:
        return list(self.slices.columns)

    @cached_property
    def aggregates_by_entity(self) -> dict[str, list[Aggregate]]:
        return {name: [a for a in self.features.aggregates if a.entity == name] for name in self.entities}

    @cached_property
    def feature_columns(self) -> list[str]:
        """Columns the feature stage adds to each row (aggregates, then the Python function's)."""
        out = [a.feature_name for a in self.features.aggregates]
        return out + (list(self.features.python.outputs) if self.features.python else [])

    @cached_property  # read per /predict request
    def request_columns(self) -> list[str]:
        """The raw columns a /predict request carries: everything the model reads from the row."""
        keys = [e.key for e in self.entities.values()]
        used = [f.column for f in self.features.numeric_columns] + self.categorical_features
        used += [n for r in self.features.ratios for n in (r.numerator, r.denominator) if n in self.columns]
        if self.timestamp:
            used.append(self.timestamp)
        return _unique(keys + used)

    def positive(self, values) -> pd.Series:
        """1.0 where the label is the positive class, else 0.0 (nulls are 0)."""
        series = values if isinstance(values, pd.Series) else pd.Series(values)
        return series.eq(self.table.positive).fillna(False).astype("float64")

    def python_features(self):
        """The escape hatch's function, imported by its `module:function` path."""
        if self.features.python is None:
            return None
        module, _, func = self.features.python.function.partition(":")
        try:
            return getattr(importlib.import_module(module), func)
        except (ImportError, AttributeError) as exc:
            raise SpecError(f"features.python.function: cannot import {self.features.python.function!r}: "
                            f"{exc}") from exc


def duration(text: str, key: str) -> pd.Timedelta:
    try:
        value = pd.Timedelta(text)
    except (ValueError, TypeError):
        raise ValueError(f"{key}: {text!r} is not a duration (e.g. 30s, 1h, 7d)") from None
    if value < pd.Timedelta(0):
        raise ValueError(f"{key}: {text!r} is negative")
    return value


def _unique(names: list[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _check_references(spec: DatasetSpec) -> None:
    """Every name the spec uses is a declared column of the right kind; errors name the key."""
    cols, table = spec.columns, spec.table

    def need(name: str | None, key: str, dtypes: tuple[str, ...] | None = None) -> None:
        if name is None:
            return
        if name not in cols:
            raise ValueError(f"{key}: {name!r} is not a declared column (declared: {', '.join(cols)})")
        if dtypes and cols[name].dtype not in dtypes:
            raise ValueError(f"{key}: {name!r} is {cols[name].dtype}, need {' or '.join(dtypes)}")

    if DERIVED_ID in cols and not table.id:
        raise ValueError(f"columns.{DERIVED_ID}: the name is taken by the derived row id; declare it as table.id "
                         "or rename the column")
    need(table.label, "table.label")
    need(table.id, "table.id", ("string", "int64"))
    need(table.timestamp, "table.timestamp", ("timestamp",))
    if table.timestamp and cols[table.timestamp].pii:
        raise ValueError(f"columns.{table.timestamp}.pii: the event time (table.timestamp) cannot be hashed: "
                         "features, windows and the monitor read it")
    label = cols[table.label]
    if label.categories is not None and len(label.categories) != 2:
        raise ValueError(f"table.label: {table.label!r} declares {len(label.categories)} categories "
                         f"{label.categories}; a binary task needs exactly two")
    if label.categories is not None and table.positive not in label.categories:
        raise ValueError(f"table.positive: {table.positive!r} is not one of the label's categories "
                         f"{label.categories}")
    for name in spec.ignore:
        need(name, "ignore")
    for name, entity in spec.entities.items():
        need(entity.key, f"entities.{name}.key", ("int64", "string"))
    model_reads = ([f.column for f in spec.features.numeric_columns] + spec.features.categorical
                   + [a.column for a in spec.features.aggregates if a.column])
    for f in spec.features.numeric_columns:
        need(f.column, "features.numeric", ("int64", "float64", "bool"))
    for name in spec.features.categorical:
        need(name, "features.categorical", ("string", "int64", "bool"))
        if not spec.categories(name):
            raise ValueError(f"features.categorical: {name!r} needs a 'categories' list under columns.{name}")
    for name in model_reads:
        if name == table.label:
            raise ValueError(f"features: the label {name!r} cannot also be a feature (it would leak the answer)")
        if name in spec.ignore:
            raise ValueError(f"features: {name!r} is listed under 'ignore'")
        if name == table.id:
            raise ValueError(f"features: the row id {name!r} cannot be a feature")
    if spec.features.time and not table.timestamp:
        raise ValueError("features.time: timestamp-derived features need table.timestamp")
    for i, agg in enumerate(spec.features.aggregates):
        key = f"features.aggregates[{i}]"
        if not table.timestamp:
            raise ValueError(f"{key}: point-in-time aggregates need table.timestamp; this table has none")
        if agg.entity not in spec.entities:
            raise ValueError(f"{key}.entity: {agg.entity!r} is not declared under 'entities' "
                             f"(declared: {', '.join(spec.entities) or 'none'})")
        need(agg.column, f"{key}.column", ("int64", "float64", "bool"))
    names = spec.feature_columns
    clash = sorted({n for n in names if names.count(n) > 1} | (set(names) & set(cols)))
    if clash:
        raise ValueError(f"features: the feature names {clash} are used twice or name a raw column; "
                         "give the aggregates distinct 'name's")
    for name in spec.slices.columns:
        need(name, "slices.columns")
    for name in spec.slices.bands:
        need(name, "slices.bands", ("int64", "float64"))
    numeric_features = [f.column for f in spec.features.numeric_columns] + spec.feature_columns
    numeric_columns = [c for c, col in cols.items() if col.dtype in ("int64", "float64")]
    for i, ratio in enumerate(spec.features.ratios):
        for side in ("numerator", "denominator"):
            name = getattr(ratio, side)
            if name not in numeric_columns + spec.feature_columns:
                raise ValueError(f"features.ratios[{i}].{side}: {name!r} is neither a numeric column nor a feature")
            if name == table.label:
                raise ValueError(f"features.ratios[{i}].{side}: the label {name!r} cannot be a feature")
    for i, check in enumerate(spec.behaviour.direction):
        for name in check.features:
            if name not in numeric_features:
                raise ValueError(f"behaviour.direction[{i}].feature: {name!r} is not a numeric feature "
                                 f"(numeric features: {', '.join(numeric_features) or 'none'})")
    for check in spec.behaviour.invariance:
        need(check.column, "behaviour.invariance.column", ("int64", "float64"))
        if check.column not in [f.column for f in spec.features.numeric_columns] + [
                a.column for a in spec.features.aggregates]:
            raise ValueError(f"behaviour.invariance.column: {check.column!r} is not read by any feature")


def _format(exc: ValidationError, path: Path) -> str:
    problems = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (see docs/own-table.md for the keys a spec may have)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        problems.append(f"{key or '(top level)'}: {msg}")
    return f"{path}: " + "; ".join(problems)


def parse_spec(raw: dict, path: Path = Path("<spec>")) -> DatasetSpec:
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of spec keys")
    try:
        return DatasetSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format(exc, path)) from None


@cache
def load_spec(path: Path = DEFAULT_SPEC_PATH) -> DatasetSpec:
    """Read and validate a dataset spec file; a SpecError names the offending key."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"spec {path} not found")
    return parse_spec(yaml.safe_load(path.read_text()), path)
