"""The dataset spec: raw columns, keys, timestamp, label and slices, declared once.

Every stage reads column names from here (validation, features, model input),
so a user can bring their own table by writing a new spec file.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, model_validator

DEFAULT_SPEC_PATH = Path(__file__).with_name("dataset.yaml")

DType = Literal["string", "int64", "float64", "timestamp"]


class Column(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dtype: DType
    min: float | None = None
    max: float | None = None
    categories: list[str | int] | None = None


class Entities(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customer: str
    merchant: str


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    id: str
    timestamp: str
    label: str
    label_rate: tuple[float, float]
    entities: Entities
    amount: str
    columns: dict[str, Column]
    categorical_features: list[str]
    slices: list[str]
    amount_bands: list[float] = []

    @model_validator(mode="after")
    def _names_are_columns(self) -> DatasetSpec:
        named = [self.id, self.timestamp, self.label, self.amount, self.entities.customer,
                 self.entities.merchant, *self.categorical_features, *self.slices]
        missing = sorted({n for n in named if n not in self.columns})
        if missing:
            raise ValueError(f"spec names columns it does not declare: {missing}")
        for name in self.categorical_features:
            if not self.columns[name].categories:
                raise ValueError(f"categorical feature {name!r} needs a 'categories' list")
        return self

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    def categories(self, column: str) -> list:
        return list(self.columns[column].categories or [])


@cache
def load_spec(path: Path = DEFAULT_SPEC_PATH) -> DatasetSpec:
    """Read and validate a dataset spec file."""
    with open(path) as f:
        return DatasetSpec.model_validate(yaml.safe_load(f))
