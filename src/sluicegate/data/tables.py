"""Bring your own table: `sluicegate init` drafts a spec from a CSV or parquet file, and
`sluicegate import` lays the table under SLUICEGATE_HOME as raw batches, checked against its spec.

Inference is a draft for a person to review, so every guess is written down as a comment in the spec.
"""

from __future__ import annotations

import json
import math
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
# One column's ROC-AUC (either way), measured: honest features reach 0.948 (ISLP Default's balance),
# 0.976 (sklearn breast cancer's best) and 0.985 (a feature generating a logistic label, slope 8); a
# post-outcome column scores 1.0, or 0.995 / 0.990 / 0.983 with 0.5% / 1% / 2% entry errors.
LEAKAGE_AUC = 0.99
# Chance: an AUC further than this many null standard deviations (Mann-Whitney) from 0.5. With the label
# permuted, the highest of 1,000 random columns per table lay 4.5 sd out (50-2,000 rows, 2-1,000
# positives), and none reached the bar; at 0.99 it asks for about 10 rows of the rarer class.
CHANCE_SD = 5
# A column present (or null) only on rows of one class, as unlikely as this by chance: a date filed for
# 60% of the positives only has a missingness AUC of 0.80, under the bar, yet gives the label away.
CHANCE_P = 1e-6
# Label rate by hour / weekday, chi-square: measured false-positive share at 0.001 was 0.0015-0.002
# (300-20,000 rows, 2-10% positive); a night rate twice the day's is found in 66% of 2,000-row tables
# and in all of 5,000-row ones.
TIME_PART_P = 0.001
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
    values = _plain(frame[label].dropna().unique())
    if len(values) != 2:
        raise TableError(f"label {label!r} has {len(values)} distinct values ({_sample(values)}); a binary task "
                         "needs exactly two. Pick another --label or map the column to two values first")
    timestamp = timestamp or _guess_timestamp(frame, notes)
    frame = _with_parsed_timestamp(frame, timestamp)
    id_column = id_column or _guess_id(frame, {label, timestamp}, notes)
    positive = _positive(values, frame[label], notes, label)
    columns = {c: _column(frame[c]) for c in frame.columns}
    columns[label]["categories"] = sorted(values, key=str)
    taken = {label, id_column, timestamp}
    labelled = frame[frame[label].notna()]
    y = (labelled[label] == positive).to_numpy()
    features = _features(frame, columns, taken, notes)
    numeric, categorical, ignore = _without_leaks(labelled, y, label, features, notes)
    time = _time_parts(labelled[timestamp], y, notes) if timestamp else []
    if id_column is None:
        notes.append(f"no unique id column: `sluicegate import` derives `{DERIVED_ID}` from each row's values")
    rate = float(y.mean())
    notes.append(f"label {label!r}: positive value {positive!r}, {rate:.2%} of {len(labelled):,} rows; "
                 "label_rate is the band a healthy batch must fall in")
    spec = {
        "spec_version": 1,
        "name": _slug(name),
        "predicts": f"whether {label} is {positive}",
        "table": {k: v for k, v in {
            "id": id_column, "timestamp": timestamp, "label": label, "positive": positive,
            "label_rate": [round(max(0.0, rate * 0.5), 4), round(min(1.0, rate * 1.5 + 0.01), 4)],
        }.items() if v is not None},
        "columns": columns,
        **({"ignore": ignore} if ignore else {}),
        "features": {k: v for k, v in {"numeric": numeric, "categorical": categorical, "time": time}.items() if v},
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
    # Event time is known on every row; a date column with nulls is filled in later, if ever.
    found = [c for c in frame.columns
             if pd.api.types.is_datetime64_any_dtype(frame[c]) and frame[c].notna().mean() > 0.99]
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
    unique = [c for c in frame.columns if c not in exclude and _unique_key(frame[c])]
    named = [c for c in unique if ID_NAMES.search(str(c))]
    if named:
        return named[0]
    if unique:
        notes.append(f"{unique[0]!r} is unique on every row: taken as the row id")
        return unique[0]
    return None


def _unique_key(values: pd.Series) -> bool:
    """Integers or codes (not prose) unique on every row: a row id, never a feature. Unique floats are
    ordinary measurements (amounts), so they stay features."""
    if not (values.notna().all() and values.is_unique):
        return False
    dtype = _column(values)["dtype"]
    return dtype == "int64" or (dtype == "string" and not _looks_like_text(values))


def _positive(values: list, label: pd.Series, notes: list[str], name: str):
    for v in values:
        if str(v).strip().lower() in POSITIVE_WORDS or (type(v) in (int, float) and v == 1):
            return v
    minority = _plain([label.value_counts().index[-1]])[0]
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


def _features(frame: pd.DataFrame, columns: dict, taken: set, notes: list[str]) -> tuple[list, list, list]:
    """(numeric, categorical, ignored) columns; each ignored one is named in the notes with the reason."""
    numeric, categorical, ignore = [], [], []
    for c in frame.columns:
        if c in taken:
            continue
        why = _not_a_feature(frame[c], columns[c])
        if why:
            notes.append(f"{c}: ignored: {why}")
            ignore.append(c)
        elif "categories" in columns[c] or columns[c]["dtype"] == "bool":
            categorical.append(c)
        else:
            numeric.append(_numeric_feature(frame[c]))
    return numeric, categorical, ignore


def _not_a_feature(values: pd.Series, column: dict) -> str | None:
    """Why the model cannot read this column as it is; None when it can."""
    present = values.dropna()
    if present.empty or (present.nunique() == 1 and len(present) == len(values)):
        return "null on every row" if present.empty else f"{_plain([present.iloc[0]])[0]!r} on every row"
    if column["dtype"] == "timestamp":
        return "another timestamp, not a feature as it is (features.python can make a duration of it)"
    if "categories" in column or (column["dtype"] in ("bool", "float64") and not _key_like(values)):
        return None
    counts = f"{present.nunique():,} distinct values in {len(values):,} rows"
    if _unique_key(values):
        return f"unique on every row ({counts}), an id rather than a feature"
    if _key_like(values):
        return f"{counts}, numbers named like a key: a candidate entity key (declare it under `entities`)"
    if column["dtype"] != "string":
        return None
    if _looks_like_time(present):
        return f"{counts}, reads as dates or times (pass --timestamp {values.name} if it is the event time)"
    if _looks_like_text(present):
        return f"{counts}, looks like free text"
    if present.nunique() > len(present) / 2:
        return f"{counts}, nearly unique: an identifier rather than a category"
    return f"{counts}, too many for a category: a candidate entity key (declare it under `entities`)"


def _key_like(values: pd.Series) -> bool:
    """Whole numbers in a column named like a key (`store_id`): labels for things, not quantities."""
    present = values.dropna()
    return (bool(ID_NAMES.search(str(values.name))) and pd.api.types.is_numeric_dtype(values)
            and not pd.api.types.is_bool_dtype(values) and bool((present == present.round()).all()))


def _looks_like_text(present: pd.Series) -> bool:
    """Most values hold a space: prose or names, not codes."""
    return len(present) > 0 and float(present.astype(str).str.contains(r"\s").mean()) > 0.5


def _looks_like_time(present: pd.Series) -> bool:
    sample = present.astype(str).head(200)
    return len(sample) > 0 and float(pd.to_datetime(sample, errors="coerce", format="mixed").notna().mean()) > 0.99


def _numeric_feature(values: pd.Series):
    present = values.dropna()
    skewed = len(present) and present.min() >= 0 and present.max() > 20 * max(present.median(), 1e-9)
    return {"column": values.name, "transform": "log1p"} if skewed else values.name


def _name(feature) -> str:
    return feature if isinstance(feature, str) else feature["column"]


def _without_leaks(frame: pd.DataFrame, y: np.ndarray, label: str, features: tuple, notes: list[str]) -> tuple:
    """(numeric, categorical, ignored) less the columns that give the label away, which go under ignore."""
    numeric, categorical, ignore = features
    if 0.5 + _chance(y) > LEAKAGE_AUC:
        notes.append(f"only {int(min(y.sum(), len(y) - y.sum())):,} rows of the rarer class: too few to tell a "
                     "leaking column from chance by its ROC-AUC; look for columns known only after the outcome")
    valued = categorical + [_name(f) for f in numeric]
    leaks = _leaky(frame, y, valued + ignore, set(valued))
    for column, found in leaks.items():
        notes.append(f"{column} alone predicts {label}: {'; '.join(found)}. That looks like leakage (a column "
                     "known only after the outcome); it is under `ignore`, put it back only if it is known at "
                     "prediction time")
    return ([f for f in numeric if _name(f) not in leaks], [c for c in categorical if c not in leaks],
            ignore + [c for c in leaks if c not in ignore])


def _leaky(frame: pd.DataFrame, y: np.ndarray, columns: list, valued: set) -> dict[str, list[str]]:
    """Columns that alone, by their values (`valued` ones) or by which rows have them, tell the label."""
    out = {}
    for c in columns:
        found = (_value_leak(frame[c], y) if c in valued else []) + _null_leak(frame[c], y)
        if found:
            out[c] = found
    return out


def _value_leak(values: pd.Series, y: np.ndarray) -> list[str]:
    present = values.notna().to_numpy()
    if not present.any():
        return []
    kept = values[present]
    if pd.api.types.is_numeric_dtype(kept) and not pd.api.types.is_bool_dtype(kept):
        score = kept.to_numpy(dtype=float)
    else:
        score = _cross_fitted_rate(kept.astype(str).to_numpy(), y[present])
    auc = _strong_auc(y[present], score)
    return [f"its values give ROC-AUC {auc:.3f}"] if auc else []


def _cross_fitted_rate(groups: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each row's category label rate, learnt on the other half of the rows: rates learnt on the row
    itself memorise rare categories (measured: 0.992 by chance with 100 rows, 50 categories)."""
    half = np.arange(len(y)) % 2 == 0
    out = np.full(len(y), y.mean())
    for fit, apply in ((half, ~half), (~half, half)):
        rates = pd.Series(y[fit]).groupby(groups[fit]).mean()
        out[apply] = pd.Series(groups[apply]).map(rates).fillna(y.mean()).to_numpy()
    return out


def _null_leak(values: pd.Series, y: np.ndarray) -> list[str]:
    """A column filled in only after the outcome: its nulls alone give the label away, whatever its values."""
    missing = values.isna().to_numpy()
    if not missing.any():
        return []
    auc = _strong_auc(y, missing)
    if auc:
        return [f"whether it is null gives ROC-AUC {auc:.3f}"]
    for state, rows in (("present", ~missing), ("null", missing)):
        n, positives = int(rows.sum()), int(y[rows].sum())
        if n and positives in (0, n):  # a one-sided fill: as likely by chance as base_rate ** n
            base = float(y.mean()) if positives else 1 - float(y.mean())
            if n * math.log(base) < math.log(CHANCE_P):
                return [f"it is {state} on {n:,} rows, every one {'positive' if positives else 'negative'}"]
    return []


def _strong_auc(y: np.ndarray, score) -> float | None:
    """The ROC-AUC either way when it reaches LEAKAGE_AUC and chance cannot explain it; else None."""
    from sklearn.metrics import roc_auc_score

    if y.all() or not y.any():
        return None
    auc = float(roc_auc_score(y, score))
    auc = max(auc, 1 - auc)
    return auc if auc >= max(LEAKAGE_AUC, 0.5 + _chance(y)) else None


def _chance(y: np.ndarray) -> float:
    """How far from 0.5 a column's ROC-AUC may stray by chance: CHANCE_SD null sds (Mann-Whitney)."""
    pos, neg = int(y.sum()), int(len(y) - y.sum())
    return CHANCE_SD * math.sqrt((pos + neg + 1) / (12 * pos * neg))


def _time_parts(stamps: pd.Series, y: np.ndarray, notes: list[str]) -> list[str]:
    """hour_of_day and day_of_week, each drafted only where the label rate varies with it beyond chance."""
    present = stamps.dropna()
    parts = [("day_of_week", "weekday", stamps.dt.dayofweek)]
    if (present == present.dt.normalize()).all():
        notes.append("no hour_of_day: the timestamps carry no time of day")
    else:
        parts.insert(0, ("hour_of_day", "hour", stamps.dt.hour))
    drafted = []
    for part, by, groups in parts:
        p = _chi_square_p(groups.to_numpy(), y)
        if p < TIME_PART_P:
            drafted.append(part)
            notes.append(f"{part}: the label rate varies by {by} (chi-square {_p(p)})")
        else:
            notes.append(f"no {part}: the label rate does not vary by {by} beyond chance "
                         f"(chi-square {_p(p)}; drafted below {TIME_PART_P})")
    return drafted


def _p(p: float) -> str:
    return f"p = {p:.2g}" if p >= 1e-12 else "p < 1e-12"


def _chi_square_p(groups: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import chi2_contingency

    table = pd.crosstab(groups, y)
    return 1.0 if min(table.shape) < 2 else float(chi2_contingency(table.to_numpy())[1])


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")
    return slug if slug and slug[0].isalpha() else f"t-{slug or 'table'}"


def _plain(values) -> list:
    """numpy scalars as plain Python values, for YAML and for the notes (no `np.float64(1.0)`)."""
    return [v.item() if isinstance(v, np.generic) else v for v in values]


def _sample(values) -> str:
    shown = ", ".join(repr(v) for v in _plain(list(values)[:5]))
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
