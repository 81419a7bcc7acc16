"""Bring your own table: `sluicegate init` drafts a spec from a CSV or parquet file, and
`sluicegate import` lays the table under SLUICEGATE_HOME as raw batches, checked against its spec.

Inference is a draft for a person to review, so every guess is written down as a comment in the spec.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from sluicegate.data.batches import write_batch
from sluicegate.runtime import sha256_file
from sluicegate.spec import DERIVED_ID, DatasetSpec, parse_spec

POSITIVE_WORDS = ("yes", "y", "true", "t", "1", "positive", "pos", "fraud", "default", "churn", "bad")
LABEL_NAMES = re.compile(r"(^|_)(label|target|y|class|outcome|default(ed)?|churn(ed)?|fraud|is_.*)$", re.I)
ID_NAMES = re.compile(r"(^|_)(id|key|uuid)$", re.I)
MAX_CATEGORIES = 50  # more distinct strings than this: an identifier or free text, not a category
LEAKAGE_AUC = 0.99  # a single column ranking the label this well is too good to be a real feature
MANIFEST = "import.json"


class TableError(ValueError):
    """A table that cannot be used as it is, saying which column and what to do."""


# --- reading -------------------------------------------------------------------------------------

def read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise TableError(f"{path} not found")
    if path.suffix.lower() in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if path.suffix.lower() in (".csv", ".txt"):
        return pd.read_csv(path)
    raise TableError(f"{path}: read CSV (.csv) or parquet (.parquet) tables, not {path.suffix or 'no suffix'}")




# --- init: infer a spec --------------------------------------------------------------------------

@dataclass
class Draft:
    spec: dict
    notes: list[str] = field(default_factory=list)  # what was guessed, for the header and the terminal

    def to_yaml(self, source: Path) -> str:
        header = [f"# Drafted by `sluicegate init {source}`: review every key before the first run.",
                  "# The keys are documented in docs/own-table.md.", "#"]
        header += [f"# - {note}" for note in self.notes]
        return "\n".join(header) + "\n" + yaml.safe_dump(self.spec, sort_keys=False, width=110)


def infer_spec(frame: pd.DataFrame, name: str, label: str | None = None, id_column: str | None = None,
               timestamp: str | None = None) -> Draft:
    """A spec for this table; refuses what it cannot handle (no label, a label with more than two values)."""
    notes: list[str] = []
    label = label or _guess_label(frame)
    if label not in frame.columns:
        raise TableError(f"--label {label!r} is not a column (columns: {', '.join(frame.columns)})")
    values = frame[label].dropna().unique()
    if len(values) != 2:
        raise TableError(f"label {label!r} has {len(values)} distinct values ({_sample(values)}); a binary task "
                         "needs exactly two. Pick another --label or map the column to two values first")
    timestamp = timestamp or _guess_timestamp(frame, notes)
    frame = _with_parsed_timestamp(frame, timestamp)
    id_column = id_column or _guess_id(frame, {label, timestamp}, notes)
    positive = _positive(values, frame[label], notes, label)
    columns = {c: _column(frame[c]) for c in frame.columns}
    columns[label]["categories"] = _plain(sorted(values, key=str))
    taken = {label, id_column, timestamp}
    numeric, categorical = [], []
    for c in frame.columns:
        if c in taken:
            continue
        kind = columns[c]
        if kind.get("categories") is not None or kind["dtype"] == "bool":
            categorical.append(c)
        elif kind["dtype"] in ("int64", "float64"):
            numeric.append(_numeric_feature(frame[c]))
        elif kind["dtype"] == "string":
            notes.append(f"{c}: {frame[c].nunique():,} distinct strings, too many for a category; ignored")
    ignore = [c for c in frame.columns if c not in taken and c not in categorical
              and c not in [f if isinstance(f, str) else f["column"] for f in numeric]]
    leaks = _leaky(frame, spec_label=label, positive=positive, columns=numeric + categorical)
    for column, auc in leaks.items():
        notes.append(f"{column} alone ranks {label} with ROC-AUC {auc:.3f}: that looks like leakage (a column "
                     "known only after the outcome); it is under `ignore`, put it back only if it is known at "
                     "prediction time")
        ignore.append(column)
    numeric = [f for f in numeric if (f if isinstance(f, str) else f["column"]) not in leaks]
    categorical = [c for c in categorical if c not in leaks]
    if id_column is None:
        notes.append(f"no unique id column: `sluicegate import` derives `{DERIVED_ID}` from each row's values")
    rate = float((frame[label] == positive).mean())
    notes.append(f"label {label!r}: positive value {positive!r}, {rate:.2%} of {len(frame):,} rows; "
                 "label_rate is the band a healthy batch must fall in")
    spec = {
        "spec_version": 1,
        "name": _slug(name),
        "predicts": f"whether {label} is {positive}",
        "table": {k: v for k, v in {
            "id": id_column, "timestamp": timestamp, "label": label, "positive": _plain([positive])[0],
            "label_rate": [round(max(0.0, rate * 0.5), 4), round(min(1.0, rate * 1.5 + 0.01), 4)],
        }.items() if v is not None},
        "columns": columns,
        **({"ignore": ignore} if ignore else {}),
        "features": {k: v for k, v in {
            "numeric": numeric, "categorical": categorical,
            "time": ["hour_of_day", "day_of_week"] if timestamp else None,
        }.items() if v},
        "slices": {"columns": categorical[:3]},
    }
    parse_spec(spec)  # the draft itself must be a valid spec
    return Draft(spec, notes)


def _guess_label(frame: pd.DataFrame) -> str:
    binary = [c for c in frame.columns if frame[c].dropna().nunique() == 2]
    named = [c for c in binary if LABEL_NAMES.search(str(c))]
    if len(named) == 1:
        return named[0]
    if len(binary) == 1:  # the only two-valued column
        return binary[0]
    raise TableError("cannot tell which column is the label"
                     + (f" (two-valued columns: {', '.join(map(str, binary))})" if binary else "")
                     + ": pass --label")


def _guess_timestamp(frame: pd.DataFrame, notes: list[str]) -> str | None:
    found = [c for c in frame.columns if pd.api.types.is_datetime64_any_dtype(frame[c])]
    for c in frame.columns:
        if c not in found and frame[c].dtype == object and re.search(r"(time|date|_at$|^ts$)", str(c), re.I):
            parsed = pd.to_datetime(frame[c], errors="coerce", utc=True)
            if parsed.notna().mean() > 0.99:
                found.append(c)
    if len(found) > 1:
        notes.append(f"several timestamp columns ({', '.join(found)}); {found[0]!r} is the event time, "
                     "pass --timestamp to choose another")
    if not found:
        notes.append("no timestamp: splits are seeded random and stratified, and there are no aggregates")
    return found[0] if found else None


def _with_parsed_timestamp(frame: pd.DataFrame, timestamp: str | None) -> pd.DataFrame:
    if timestamp is None:
        return frame
    if timestamp not in frame.columns:
        raise TableError(f"--timestamp {timestamp!r} is not a column")
    return frame.assign(**{timestamp: pd.to_datetime(frame[timestamp], utc=True)})


def _guess_id(frame: pd.DataFrame, exclude: set, notes: list[str]) -> str | None:
    unique = [c for c in frame.columns if c not in exclude and frame[c].notna().all() and frame[c].is_unique
              and (frame[c].dtype == object or pd.api.types.is_integer_dtype(frame[c]))]
    named = [c for c in unique if ID_NAMES.search(str(c))]
    if named:
        return named[0]
    if unique and frame[unique[0]].dtype == object:
        notes.append(f"{unique[0]!r} is unique on every row: taken as the row id")
        return unique[0]
    return None


def _positive(values, label: pd.Series, notes: list[str], name: str):
    for v in values:
        if str(v).strip().lower() in POSITIVE_WORDS:
            return v
    minority = label.value_counts().index[-1]
    notes.append(f"label {name!r}: neither value reads as positive; the rarer one, {minority!r}, is taken")
    return minority


def _column(values: pd.Series) -> dict:
    present = values.dropna()
    if pd.api.types.is_datetime64_any_dtype(values):
        out = {"dtype": "timestamp"}
    elif pd.api.types.is_bool_dtype(values):
        out = {"dtype": "bool"}
    elif pd.api.types.is_integer_dtype(values) or (pd.api.types.is_float_dtype(values)
                                                  and len(present) and (present == present.round()).all()
                                                  and values.isna().any()):
        out = {"dtype": "int64"} if not values.isna().any() else {"dtype": "float64"}
    elif pd.api.types.is_float_dtype(values):
        out = {"dtype": "float64"}
    else:
        out = {"dtype": "string"}
        distinct = present.unique()
        if len(distinct) <= MAX_CATEGORIES and len(distinct) < max(2, 0.5 * len(present)):
            out["categories"] = sorted(str(v) for v in distinct)
    if out["dtype"] in ("int64", "float64") and len(present) and present.min() >= 0:
        out["min"] = 0
    share = float(values.isna().mean())
    if share > 0:
        out["max_null_share"] = round(min(1.0, share * 2 + 0.01), 4)
    return out


def _numeric_feature(values: pd.Series):
    present = values.dropna()
    skewed = len(present) and present.min() >= 0 and present.max() > 20 * max(present.median(), 1e-9)
    return {"column": values.name, "transform": "log1p"} if skewed else values.name


def _leaky(frame: pd.DataFrame, spec_label: str, positive, columns: list) -> dict[str, float]:
    """Columns whose values alone rank the label almost perfectly (ROC-AUC either way)."""
    from sklearn.metrics import roc_auc_score

    y = (frame[spec_label] == positive).to_numpy()
    out = {}
    for item in columns:
        name = item if isinstance(item, str) else item["column"]
        col = frame[name]
        if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
            score = col.fillna(col.median()).to_numpy(dtype=float)
        else:  # a category's own label rate
            score = frame.groupby(col.astype(str))[spec_label].transform(lambda s: (s == positive).mean()).to_numpy()
        auc = roc_auc_score(y, score)
        auc = max(auc, 1 - auc)
        if auc >= LEAKAGE_AUC:
            out[name] = float(auc)
    return out


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")
    return slug if slug and slug[0].isalpha() else f"t-{slug or 'table'}"


def _plain(values) -> list:
    """numpy scalars as plain Python values, for YAML."""
    return [v.item() if isinstance(v, np.generic) else v for v in values]


def _sample(values) -> str:
    shown = ", ".join(repr(v) for v in list(values)[:5])
    return shown + (", ..." if len(values) > 5 else "")


# --- import: check and lay out -------------------------------------------------------------------

@dataclass
class ImportOutcome:
    batch_dir: Path
    rows: int
    sha256: str
    derived_id: bool

    def summary(self) -> str:
        derived = f"; `{DERIVED_ID}` derived from each row's values" if self.derived_id else ""
        return (f"import: {self.rows:,} rows -> {self.batch_dir} (source sha256 {self.sha256[:12]}, "
                f"unchanged){derived}")


def import_table(path: Path, spec: DatasetSpec, raw_dir: Path, batch_id: str | None = None) -> ImportOutcome:
    """Check the table against its spec and write it as a raw batch (by day when there is a timestamp).
    The source file is only read; its checksum goes into the batch's manifest."""
    path = Path(path)
    checksum = sha256_file(path)
    frame = conform(read_table(path), spec, where=str(path))
    derived = spec.table.id is None
    if derived:
        frame.insert(0, DERIVED_ID, derive_row_ids(frame))
    batch_id = batch_id or f"{_slug(path.stem)}-{checksum[:8]}"
    batch_dir = write_batch(frame[spec.column_names], raw_dir, batch_id, spec.timestamp)
    (batch_dir / MANIFEST).write_text(json.dumps({"source": str(path.resolve()), "sha256": checksum,
                                                  "rows": len(frame), "spec": spec.name,
                                                  "derived_id": DERIVED_ID if derived else None}, indent=2))
    return ImportOutcome(batch_dir, len(frame), checksum, derived)


def conform(frame: pd.DataFrame, spec: DatasetSpec, where: str) -> pd.DataFrame:
    """The table with the spec's dtypes; every mismatch is an error naming the column and what to do."""
    declared = list(spec.columns)
    missing = [c for c in declared if c not in frame.columns]
    if missing:
        raise TableError(f"{where}: the spec declares columns the table lacks: {missing}")
    extra = [c for c in frame.columns if c not in declared]
    if extra:
        raise TableError(f"{where}: columns not in the spec: {extra}; declare them under `columns` "
                         "(and `ignore` if the model must not read them)")
    out = frame[declared].copy()
    for name, col in spec.columns.items():
        out[name] = _cast(out[name], col.dtype, f"{where}: column {name!r}")
        if col.categories is not None:
            outside = out[name].dropna()[~out[name].dropna().isin(col.categories)]
            if len(outside):
                counts = ", ".join(f"{v!r}: {n}" for v, n in outside.value_counts().head(10).items())
                raise TableError(f"{where}: column {name!r} has values outside its categories "
                                 f"{col.categories}: {counts}; add them to columns.{name}.categories")
    if spec.table.id and not out[spec.table.id].is_unique:
        dupes = out[spec.table.id][out[spec.table.id].duplicated()].head(5).tolist()
        raise TableError(f"{where}: the id column {spec.table.id!r} is not unique (e.g. {dupes}); "
                         "fix the table or drop table.id to have a row id derived")
    return out


def _cast(values: pd.Series, dtype: str, where: str) -> pd.Series:
    try:
        if dtype == "timestamp":
            return pd.to_datetime(values, utc=True)
        if dtype == "string":
            return values.astype("object").where(values.notna(), None).map(lambda v: v if v is None else str(v))
        if dtype == "bool":
            return values.astype("boolean") if values.isna().any() else values.astype(bool)
        if dtype == "int64":
            return values.astype("Int64") if values.isna().any() else values.astype("int64")
        return values.astype("float64")
    except (ValueError, TypeError) as exc:
        raise TableError(f"{where} cannot be read as {dtype}: {exc}") from None


def derive_row_ids(frame: pd.DataFrame) -> list[str]:
    """A stable id per row: a hash of its values and of how many identical rows came before it."""
    hashed = pd.util.hash_pandas_object(frame, index=False).to_numpy()
    seen: dict[int, int] = {}
    out = []
    for h in hashed.tolist():
        n = seen.get(h, 0)
        seen[h] = n + 1
        out.append(f"{h:016x}-{n}")
    return out
