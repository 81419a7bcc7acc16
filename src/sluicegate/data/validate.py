"""The data validation gate: a Great Expectations suite derived from the dataset spec.

The GX file context lives in `expectations/` and is checked in (config, suite, validation
definition, checkpoint); results and Data Docs go to `expectations/uncommitted/`.
`build_context` regenerates the suite from the spec, so the checked-in files and the
run-time suite cannot drift apart. The batch window is a suite parameter supplied per run.

Great Expectations is imported inside functions: it takes seconds to import, and
importing this module (e.g. from the CLI) should not pay for it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from sluicegate.config import file_lock
from sluicegate.spec import DatasetSpec

if TYPE_CHECKING:
    from great_expectations.data_context import AbstractDataContext

DATASOURCE = "sluicegate_pandas"
BATCH_DEFINITION = "whole_batch"
DOCS_SITE = "local_site"
LOCK_FILE = "uncommitted/sluicegate.lock"
MAX_SAMPLES = 10

# How each spec dtype is checked with ExpectColumnValuesToBeOfType on pandas. "str" accepts
# object columns holding str and pandas string dtypes; "Timestamp" accepts tz-aware datetime
# columns only, which the batch window comparison needs.
GX_TYPES = {"string": "str", "int64": "int64", "float64": "float64", "bool": "bool", "timestamp": "Timestamp"}


@dataclass
class FailedCheck:
    expectation: str
    column: str | None
    detail: str
    unexpected_count: int | None = None
    unexpected_percent: float | None = None
    sample_values: list = field(default_factory=list)


@dataclass
class ValidationReport:
    batch_id: str
    success: bool
    row_count: int
    evaluated: int
    failures: list[FailedCheck]
    data_docs: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        status = "PASSED" if self.success else "FAILED"
        lines = [
            f"# Validation report: {self.batch_id}",
            "",
            f"**{status}**: {self.evaluated - len(self.failures)} of {self.evaluated} checks passed "
            f"on {self.row_count:,} rows.",
            "",
        ]
        if self.data_docs:
            lines += [f"Data Docs: {self.data_docs}", ""]
        if self.failures:
            lines += ["| Expectation | Column | Detail | Unexpected | Unexpected % | Sample values |",
                      "|---|---|---|---:|---:|---|"]
            for f in self.failures:
                count = "" if f.unexpected_count is None else f"{f.unexpected_count:,}"
                pct = "" if f.unexpected_percent is None else f"{f.unexpected_percent:.2f}"
                samples = ", ".join(_short(v) for v in f.sample_values)
                cells = [f.expectation, f.column or "(table)", f.detail, count, pct, samples]
                lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
        return "\n".join(lines) + "\n"

    def summary(self, quarantined_to: Path | str | None = None) -> str:
        """One paragraph for the CLI; pass where the batch was moved if it was quarantined."""
        if self.success:
            return (f"Batch {self.batch_id} passed all {self.evaluated} checks "
                    f"on {self.row_count:,} rows.")
        checks = "; ".join(f"{f.column or 'table'}: {f.expectation} ({f.detail})" for f in self.failures)
        text = f"Batch {self.batch_id} failed {len(self.failures)} of {self.evaluated} checks: {checks}"
        if quarantined_to is not None:
            text += f"; quarantined to {quarantined_to}"
        return text + "; nothing was trained."


def write_report(report: ValidationReport, folder: Path) -> tuple[Path, Path]:
    """Write validation_report.json and validation_report.md into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "validation_report.json"
    md_path = folder / "validation_report.md"
    json_path.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    md_path.write_text(report.to_markdown())
    return json_path, md_path


# --- the suite, from the spec ---------------------------------------------------------------


def build_expectations(spec: DatasetSpec) -> list:
    """Every expectation of the gate, named from the spec only."""
    import great_expectations.expectations as gxe

    exps: list = [
        # Exact set: catches dropped, renamed and extra columns in one check.
        gxe.ExpectTableColumnsToMatchSet(column_set=spec.column_names, exact_match=True),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
    ]
    for name, col in spec.all_columns.items():
        if not col.nullable:  # nullable with a share: at most that share; nullable alone: any share
            exps.append(gxe.ExpectColumnValuesToNotBeNull(column=name, mostly=1 - (col.max_null_share or 0.0)))
        exps.append(gxe.ExpectColumnValuesToBeOfType(column=name, type_=GX_TYPES[col.dtype]))
        if col.min is not None or col.max is not None:
            exps.append(gxe.ExpectColumnValuesToBeBetween(column=name, min_value=col.min, max_value=col.max))
        if col.categories:
            exps.append(gxe.ExpectColumnValuesToBeInSet(column=name, value_set=list(col.categories)))
    # The label-rate band as two share checks, for any label type (1, "Yes", true): at least `low`
    # of the rows are positive, and at least 1 - `high` are not.
    low, high = spec.label_rate
    positive = [spec.table.positive]
    if low > 0:
        exps.append(gxe.ExpectColumnValuesToBeInSet(column=spec.label, value_set=positive, mostly=low))
    if high < 1:
        exps.append(gxe.ExpectColumnValuesToNotBeInSet(column=spec.label, value_set=positive, mostly=1 - high))
    exps.append(gxe.ExpectColumnValuesToBeUnique(column=spec.id))
    if spec.timestamp:
        # The window differs per batch, so it is a suite parameter given at run time.
        exps.append(gxe.ExpectColumnValuesToBeBetween(
            column=spec.timestamp, min_value={"$PARAMETER": "window_start"},
            max_value={"$PARAMETER": "window_end"}, strict_max=True))
    return exps


# --- the file context --------------------------------------------------------------------------


@contextmanager
def _context_lock(context_root: Path) -> Iterator[None]:
    """Serialize processes that build or run the same context (GX file stores are not atomic)."""
    with file_lock(context_root / LOCK_FILE):
        yield


def _open_context(context_root: Path) -> AbstractDataContext:
    """Open (or scaffold) the file context; quiet it once, so its config stays stable."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", context_root_dir=str(context_root))
    if not _is_quiet(context.variables):
        context.variables.analytics_enabled = False
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        context.variables.save()
    return context


def _is_quiet(variables) -> bool:
    bars = variables.progress_bars  # a ProgressBarsConfig when set here, a dict once read back
    globally = bars.get("globally") if isinstance(bars, dict) else getattr(bars, "globally", None)
    return variables.analytics_enabled is False and globally is False


def suite_name(spec: DatasetSpec) -> str:
    """Each spec has its own asset, suite, validation definition and checkpoint in the one context."""
    return spec.name


def checkpoint_name(spec: DatasetSpec) -> str:
    return f"{spec.name}_gate"


def _batch_definition(context: AbstractDataContext, spec: DatasetSpec):
    """Get the whole-dataframe batch definition, adding it only if missing (keeps ids stable)."""
    sources = context.data_sources
    source = (sources.get(DATASOURCE) if DATASOURCE in sources.all()
              else sources.add_pandas(name=DATASOURCE))
    names = [a.name for a in source.assets]
    asset_name = suite_name(spec)
    asset = source.get_asset(asset_name) if asset_name in names else source.add_dataframe_asset(name=asset_name)
    if BATCH_DEFINITION in [b.name for b in asset.batch_definitions]:
        return asset.get_batch_definition(BATCH_DEFINITION)
    return asset.add_batch_definition_whole_dataframe(BATCH_DEFINITION)


def _suite(context: AbstractDataContext, spec: DatasetSpec):
    """Add or update the suite; unchanged expectations keep their ids so the file does not churn."""
    import great_expectations as gx

    name = suite_name(spec)
    suite = gx.ExpectationSuite(name=name, expectations=build_expectations(spec))
    if name in [s.name for s in context.suites.all()]:
        # GX compares ids in Expectation equality, so match on the rest ourselves.
        old_ids = {_fingerprint(e): e.id for e in context.suites.get(name).expectations}
        for exp in suite.expectations:
            exp.id = old_ids.get(_fingerprint(exp))
    return context.suites.add_or_update(suite)


def _fingerprint(expectation) -> str:
    config = expectation.configuration.to_json_dict()
    config.pop("id", None)
    return json.dumps(config, sort_keys=True, default=str)


def build_context(context_root: Path, spec: DatasetSpec) -> AbstractDataContext:
    """(Re)build data source, suite, validation definition and checkpoint from the spec.

    Idempotent: a second call rewrites the same bytes, so the checked-in files only change
    when the spec does. Safe to call from several processes at once.
    """
    context_root = Path(context_root)
    with _context_lock(context_root):
        return _build_context(context_root, spec)


def _build_context(context_root: Path, spec: DatasetSpec) -> AbstractDataContext:
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    context = _open_context(context_root)
    batch_definition = _batch_definition(context, spec)
    suite = _suite(context, spec)
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=suite_name(spec), data=batch_definition, suite=suite))
    context.checkpoints.add_or_update(gx.Checkpoint(
        name=checkpoint_name(spec), validation_definitions=[definition],
        actions=[UpdateDataDocsAction(name="update_data_docs", site_names=[DOCS_SITE])],
        result_format="BASIC"))
    return context


# --- running the gate ----------------------------------------------------------------------------


def validate_batch(df: pd.DataFrame, spec: DatasetSpec, batch_id: str, window_start: pd.Timestamp | None,
                   window_end: pd.Timestamp | None, context_root: Path = Path("expectations")) -> ValidationReport:
    """Validate one batch against the spec's suite; never raises on bad data."""
    from great_expectations.core.run_identifier import RunIdentifier

    context_root = Path(context_root)
    with _context_lock(context_root):
        context = _build_context(context_root, spec)
        result = context.checkpoints.get(checkpoint_name(spec)).run(
            batch_parameters={"dataframe": _fast_frame(df, spec)},
            expectation_parameters=({"window_start": _utc(window_start), "window_end": _utc(window_end)}
                                    if spec.timestamp else {}),
            run_id=RunIdentifier(run_name=batch_id),
        )
        docs = context.get_docs_sites_urls(site_name=DOCS_SITE)
        _release_batch(context)
    (validation,) = result.run_results.values()
    outcome = validation.to_json_dict()
    failures = [_failed_check(r, df) for r in outcome["results"] if not r["success"]]
    # GX returns results in no useful order: table checks first, then columns in spec order.
    position = {name: i for i, name in enumerate(spec.column_names)}
    failures.sort(key=lambda f: (position.get(f.column, -1), f.expectation))
    return ValidationReport(
        batch_id=batch_id,
        success=bool(outcome["success"]),
        row_count=len(df),
        evaluated=len(outcome["results"]),
        failures=failures,
        data_docs=docs[0]["site_url"] if docs else None,
    )


def _release_batch(context: AbstractDataContext) -> None:
    """Drop the validated frame from GX's batch cache: the datasource's execution engine outlives
    the run and would hold a copy of the whole batch for the rest of the process."""
    batches = context.data_sources.get(DATASOURCE).get_execution_engine().batch_manager
    batches.reset_batch_cache()
    batches.batch_data_cache.clear()  # the frames themselves; GX has no reset for this one


def _utc(ts) -> pd.Timestamp:
    """Batch timestamps are UTC; a naive window bound is read as UTC so the comparison works."""
    ts = pd.Timestamp(ts)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def compact_strings(df: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """The same values with each spec string column that holds only strings as pyarrow strings.

    A Python string object costs about 50 bytes beyond its characters, so a table's ids alone cost
    more than its numbers; pyarrow strings keep the characters and an offset. GX's null, set and
    type checks on them are also cheap. Anything else stays as it is, so the type check still
    reports odd values."""
    out = df.copy(deep=False)
    for name, col in spec.all_columns.items():
        if col.dtype != "string" or name not in out.columns or out[name].dtype != object:
            continue
        if pd.api.types.infer_dtype(out[name], skipna=True) == "string":
            out[name] = out[name].astype("string[pyarrow]")
    return out


def _fast_frame(df: pd.DataFrame, spec: DatasetSpec) -> pd.DataFrame:
    """The same values in a layout GX's pandas engine handles about twice as fast: compact strings,
    then one copy that consolidates the blocks (GX filters the whole frame many times and would
    re-consolidate)."""
    return compact_strings(df, spec).copy()


def _failed_check(result: dict, df: pd.DataFrame) -> FailedCheck:
    """Turn one failed GX result (already JSON-safe) into a FailedCheck."""
    config = result["expectation_config"]
    kwargs, kind = config["kwargs"], config["type"]
    column = kwargs.get("column")
    # GX fails expectations on absent columns with an exception or an empty result.
    if column is not None and column not in df.columns:
        return FailedCheck(kind, column, f"column '{column}' is missing")
    errors = _exception_messages(result.get("exception_info") or {})
    if errors:
        where = f" on dtype {df[column].dtype}" if column is not None else ""
        return FailedCheck(kind, column, f"could not be evaluated{where}: {errors[0]}")
    res = result.get("result") or {}
    return FailedCheck(
        expectation=kind,
        column=column,
        detail=_detail(kind, kwargs, res),
        unexpected_count=res.get("unexpected_count"),
        unexpected_percent=_round(res.get("unexpected_percent")),
        sample_values=_samples(res),
    )


def _exception_messages(info: dict) -> list[str]:
    """Messages from exception_info: one flat record, or one record per failed metric."""
    records = [info] if "raised_exception" in info else list(info.values())
    messages = []
    for record in records:
        if isinstance(record, dict) and record.get("raised_exception", True):
            text = (record.get("exception_message") or "").strip()
            messages.append(text.splitlines()[-1] if text else "unknown error")
    return messages


def _detail(kind: str, kwargs: dict, res: dict) -> str:
    """One human line: what was expected vs. what was observed."""
    count, pct = res.get("unexpected_count"), _round(res.get("unexpected_percent"))
    share = f"{count:,} of {res.get('element_count', 0):,} values ({pct}%)" if count is not None else ""
    if kind == "expect_table_columns_to_match_set":
        mismatch = (res.get("details") or {}).get("mismatched") or {}
        parts = [f"{k} {sorted(v)}" for k, v in sorted(mismatch.items()) if v]
        return "columns differ from the spec: " + ("; ".join(parts) or f"got {res.get('observed_value')}")
    if kind == "expect_column_values_to_not_be_null":
        return f"{share} are null"
    if kind == "expect_column_values_to_be_of_type":
        wanted = "tz-aware Timestamp" if kwargs["type_"] == "Timestamp" else kwargs["type_"]
        if count is None:  # judged on the column dtype, not value by value
            return f"column dtype is {res.get('observed_value')}, expected {wanted}"
        return f"{share} are not {wanted}"
    if kind == "expect_column_values_to_be_between":
        high = ")" if kwargs.get("strict_max") else "]"
        return f"{share} outside [{kwargs.get('min_value')}, {kwargs.get('max_value')}{high}"
    if kind == "expect_column_values_to_be_in_set" and kwargs.get("mostly", 1) < 1:  # the label rate's floor
        return (f"positive share {1 - (pct or 0) / 100:.2%} is below the spec's label_rate floor "
                f"{kwargs['mostly']:.2%} (positive = {kwargs['value_set'][0]!r})")
    if kind == "expect_column_values_to_not_be_in_set":  # the label rate's ceiling
        return (f"positive share {(pct or 0) / 100:.2%} is above the spec's label_rate ceiling "
                f"{1 - kwargs.get('mostly', 1):.2%} (positive = {kwargs['value_set'][0]!r})")
    if kind == "expect_column_values_to_be_in_set":
        return f"{share} not in {kwargs['value_set']}"
    if kind == "expect_column_values_to_be_unique":
        return f"{share} are duplicated"
    if kind.endswith("_to_be_between"):
        low, high = kwargs.get("min_value"), kwargs.get("max_value")
        wanted = f"at least {low}" if high is None else f"at most {high}" if low is None else \
            f"between {low} and {high}"
        return f"observed {res.get('observed_value')}, expected {wanted}"
    return f"observed {res.get('observed_value', share)}, expected {kwargs}"


def _samples(res: dict) -> list:
    """Distinct offending values, first seen first, at most MAX_SAMPLES."""
    seen: list = []
    for value in res.get("partial_unexpected_list") or []:
        if isinstance(value, float) and math.isnan(value):
            value = None
        if value not in seen:
            seen.append(value)
        if len(seen) == MAX_SAMPLES:
            break
    return seen


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 4)


def _short(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


if __name__ == "__main__":
    # Regenerate the checked-in context from a spec: python -m sluicegate.data.validate [root] [spec]
    import sys

    from sluicegate.spec import DEFAULT_SPEC_PATH, load_spec

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "expectations")
    build_context(root, load_spec(Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_SPEC_PATH))
    print(f"Great Expectations context rebuilt under {root}/")
