"""Personal data in the prediction log: what the server writes of the columns a spec marks `pii: true`.

- hashed: text, booleans, categories, the row id and entity keys are written as tokens, a keyed hash
  (HMAC-SHA256 under the home's secret key `SLUICEGATE_HOME/pii.key`, made once with mode 0600). One
  value always gives one token, so the monitor still counts categories and late labels still meet
  their predictions, but without the key a token says nothing of its value.
- dropped: numbers the model reads as numbers (an amount, an age), and the model inputs made from any
  pii column (`input.<name>`, which the transform or the spec's category list would turn back into
  the value). A hash of a number keeps nothing a drift check could compare.

The raw values are never written: not in the parquet log, not in the dead-letter folder (a tensor
holding a pii input is withheld there). A token of a value from a short list (a declared category)
hides it from whoever lacks the key, not from whoever holds it: the monitor maps those tokens back to
their categories, in memory, to compare them with training. Keep the key as private as the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import hmac
import math
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa

from sluicegate.config import HomePaths
from sluicegate.features.inputs import INPUT_PREFIX, MISSING, numeric_inputs
from sluicegate.spec import DatasetSpec

if TYPE_CHECKING:
    from sluicegate.serve.predlog import Record

KEY_BYTES = 32
TOKEN_CHARS = 32  # hex digits of the HMAC kept: 128 bits, no collision among any table's values
CACHED_TOKENS = 65_536  # ids and categories repeat: a hit costs a dict lookup instead of an HMAC
WITHHELD = "withheld: holds personal data (a pii column)"


class PiiKeyError(RuntimeError):
    """The home's key file exists but is not a key."""


# --- the key and the tokens ------------------------------------------------------------------------


def home_key(path: Path) -> bytes:
    """The home's key, made on first use; every process of the home reads the same one."""
    if not path.exists():
        _make_key(path)
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise PiiKeyError(f"{path} holds {len(key)} bytes, not a {KEY_BYTES}-byte key: restore it from a backup "
                          "(a new key gives new tokens, which meet none logged before)")
    return key


def _make_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(secrets.token_bytes(KEY_BYTES))
        # A link is whole or absent (no reader sees half a key) and fails when another process won.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def canonical(value) -> str | None:
    """One text per value, so an id sent as 42 and labelled as "42" or 42.0 gets one token; None: missing."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return None
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    return str(value)


class Pseudonyms:
    """Tokens under one key: the same value, the same token; a missing value stays missing."""

    def __init__(self, key: bytes):
        self._key = key
        self._hash = functools.lru_cache(maxsize=CACHED_TOKENS)(self._hmac)

    def _hmac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()[:TOKEN_CHARS]

    def token(self, value) -> str | None:
        text = canonical(value)
        return None if text is None else self._hash(text)

    def tokens(self, values: Iterable) -> list[str | None]:
        return [self.token(v) for v in values]


def pseudonyms(spec: DatasetSpec, paths: HomePaths) -> Pseudonyms | None:
    """The home's tokens for a spec with personal data; None (and no key made) for one without."""
    return Pseudonyms(home_key(paths.pii_key)) if spec.pii_columns else None


# --- which columns -----------------------------------------------------------------------------------


def _identifiers(spec: DatasetSpec) -> set[str]:
    return {spec.table.id, *(e.key for e in spec.entities.values())} - {None}


def dropped_columns(spec: DatasetSpec) -> list[str]:
    """pii columns the log leaves out: numbers that measure something (not ids, keys or categories)."""
    ids = _identifiers(spec)
    return [n for n in spec.pii_columns if spec.columns[n].dtype == "float64"
            or (spec.columns[n].dtype == "int64" and not spec.columns[n].categories and n not in ids)]


def hashed_columns(spec: DatasetSpec) -> list[str]:
    """pii columns the log writes as tokens: everything pii but the dropped numbers."""
    dropped = set(dropped_columns(spec))
    return [n for n in spec.pii_columns if n not in dropped]


def dropped_inputs(spec: DatasetSpec) -> dict[str, set[str]]:
    """The logged model inputs (`input.<name>`) made from a pii column, per tensor: a number's transformed
    value and missing indicator, a category's code."""
    pii = set(spec.pii_columns)
    return {"numeric": {INPUT_PREFIX + n for n in numeric_inputs(spec) if n.removesuffix(MISSING) in pii},
            "categorical": {INPUT_PREFIX + c for c in spec.categorical_features if c in pii}}


def unreadable_columns(spec: DatasetSpec) -> list[str]:
    """pii columns the monitor cannot read back: the dropped numbers, and tokens of values no category
    list names. Their data-quality checks do not apply to the log."""
    return [n for n in spec.pii_columns if n in dropped_columns(spec) or not spec.categories(n)]


# --- the server's side: what a record becomes -------------------------------------------------------


@dataclass(frozen=True)
class LogRedactor:
    """What the prediction log keeps of a record of a spec with personal data."""

    pseudonyms: Pseudonyms
    hashed: frozenset[str]
    dropped: frozenset[str]
    dropped_inputs: frozenset[str]
    withheld: frozenset[str]  # the tensors (`numeric`, `categorical`) holding a dropped input
    hash_ids: bool  # the row id is pii: request ids are tokens too

    @classmethod
    def of(cls, spec: DatasetSpec, tokens: Pseudonyms) -> LogRedactor:
        inputs = dropped_inputs(spec)
        return cls(tokens, frozenset(hashed_columns(spec)), frozenset(dropped_columns(spec)),
                   frozenset().union(*inputs.values()), frozenset(name for name, gone in inputs.items() if gone),
                   spec.table.id in spec.pii_columns)

    def record(self, record: Record) -> Record:
        """The record with its pii fields hashed or left out (before any conversion, so no error message
        or dead letter can quote a raw value)."""
        features = {name: self.pseudonyms.tokens(values) if name in self.hashed else values
                    for name, values in record.features.items() if name not in self.dropped}
        ids = self.pseudonyms.tokens(record.request_ids) if self.hash_ids else record.request_ids
        return dataclasses.replace(record, request_ids=ids, features=features)

    def table(self, table: pa.Table) -> pa.Table:
        """The converted rows without the model inputs made from a pii column."""
        gone = [name for name in table.column_names if name in self.dropped_inputs]
        return table.drop_columns(gone) if gone else table

    def dead_letter(self, features: dict) -> dict:
        """A redacted record's features for the dead-letter folder: a tensor holding a pii input withheld."""
        return {name: WITHHELD if name in self.withheld else values for name, values in features.items()}


def log_redactor(spec: DatasetSpec, paths: HomePaths) -> LogRedactor | None:
    """The prediction log's redactor for the spec (the home's key made on first use); None without pii."""
    tokens = pseudonyms(spec, paths)
    return None if tokens is None else LogRedactor.of(spec, tokens)


# --- the monitor's side: reading tokens back --------------------------------------------------------


def categories_from_tokens(log: pd.DataFrame, spec: DatasetSpec, tokens: Pseudonyms | None) -> pd.DataFrame:
    """The log with a pii categorical's tokens as its declared categories again (in memory, for drift and
    data quality); a token of no declared category stays a token, which counts as another value."""
    if tokens is None:
        return log
    named = [n for n in hashed_columns(spec) if spec.categories(n) and n in log.columns]
    if not named:
        return log
    log = log.copy()
    for name in named:
        lookup = {tokens.token(c): c for c in spec.categories(name)}
        log[name] = log[name].map(lambda t, lookup=lookup: lookup.get(t, t), na_action="ignore")
    return log
