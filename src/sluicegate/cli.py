"""The `sluicegate` command line."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sluicegate.config import CorruptHomeError, Settings, ensure_home

app = typer.Typer(help="Sluicegate: a gated pipeline from raw batch to served ONNX model.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(stderr=True, soft_wrap=True)

EXIT_BLOCKED = 3


# Third-party noise, each by name (message and/or module), the same list as pyproject's pytest
# filterwarnings: (message regex, category, module regex).
LIBRARY_NOISE = (
    ("", DeprecationWarning, "mlflow"),  # SQLAlchemy 2.1's deprecations, raised inside MLflow's store
    (".*does not refer to an OperatorClass", DeprecationWarning, ""),  # SQLAlchemy 2.1 on Prefect's UUID
    ("", DeprecationWarning, "great_expectations"),  # its imports of sre_parse / sre_constants
    (r".*isinstance\(treespec, LeafSpec\)", FutureWarning, ""),  # torch's ONNX exporter
    (".*axis name.*will not be used", UserWarning, ""),  # torch's ONNX exporter, dynamic batch axis
)


@app.callback()
def _quiet_library_noise() -> None:
    """Keep named third-party chatter out of the operator's terminal; our own warnings stay visible."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for message, category, module in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    warnings.filterwarnings("default", category=DeprecationWarning, module="sluicegate")
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)


SpecOption = Annotated[Path | None, typer.Option(
    "--spec", help="The table's dataset spec [SLUICEGATE_SPEC_PATH]; default: the built-in example")]


def _settings(spec: Path | None) -> Settings:
    """Settings for the table the command is about; a bad spec ends here with the key it names."""
    from sluicegate.spec import SpecError

    if spec is not None:  # through the environment, so flows and their subprocesses read the same spec
        os.environ["SLUICEGATE_SPEC_PATH"] = str(spec.resolve())
    try:
        return Settings()
    except (SpecError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _check_target(settings: Settings) -> None:
    """A target that is unknown, disagrees with its hardware profile or whose provider is not installed
    ends the command here, before any work, naming what to install."""
    from sluicegate.hardware import hardware
    from sluicegate.runtime import ProviderUnavailable

    try:
        hardware(settings)
    except (ProviderUnavailable, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _home(settings: Settings):
    try:
        return ensure_home(settings.paths)
    except CorruptHomeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@contextmanager
def _registry_answers() -> Iterator[None]:
    """MLflow failing to answer (down, refusing, timing out) ends the command with its one-line reason."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        console.print(f"[red]error:[/red] the MLflow registry did not answer: {exc.message}")
        raise typer.Exit(1) from None


def _check_policy(settings: Settings) -> None:
    """A broken gates.yaml is an error before any work."""
    from sluicegate.policy import GatePolicyError, load_policy

    try:
        load_policy(settings.gates_path)
    except GatePolicyError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def generate(
    spec: SpecOption = None,
    rows: Annotated[int, typer.Option(help="Number of transactions")] = 200_000,
    days: Annotated[int, typer.Option(help="Days of history, one parquet partition each")] = 30,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same batch")] = 7,
    start: Annotated[str, typer.Option(help="First day, YYYY-MM-DD (UTC)")] = "2026-10-01",
    drift: Annotated[str, typer.Option(help="none, amount, category or country")] = "none",
    fault: Annotated[str, typer.Option(help="none, nulls, out_of_range, drop_column, rename_column, "
                                            "bad_dtype, duplicates or label_flip")] = "none",
) -> None:
    """Write a synthetic card-transaction batch under SLUICEGATE_HOME/raw."""
    from sluicegate.data import batches as data
    from sluicegate.data import synthetic
    from sluicegate.spec import DEFAULT_SPEC_PATH, load_spec

    if drift not in synthetic.DRIFTS:
        raise typer.BadParameter(f"--drift must be one of {', '.join(synthetic.DRIFTS)}, not {drift!r}")
    if fault not in synthetic.FAULTS:
        raise typer.BadParameter(f"--fault must be one of {', '.join(synthetic.FAULTS)}, not {fault!r}")
    settings = _settings(spec)
    paths = _home(settings)
    spec = load_spec(settings.spec_path)
    if spec.column_names != load_spec(DEFAULT_SPEC_PATH).column_names:
        console.print(f"[red]error:[/red] generate writes the built-in example table; {settings.spec_path} "
                      "declares other columns. Bring that table in with `sluicegate import TABLE --spec SPEC`")
        raise typer.Exit(2)
    cfg = synthetic.GenerateConfig(rows=rows, days=days, seed=seed, start=start, drift=drift, fault=fault)
    started = time.perf_counter()
    with console.status(f"generating {rows:,} transactions over {days} days"):
        frame = synthetic.inject_fault(synthetic.generate_transactions(cfg, spec), cfg.fault, spec, seed)
        batch_dir = data.write_batch(frame, paths.raw, cfg.batch_id, spec.timestamp)
    console.print(f"generate: {len(frame):,} transactions, label rate {frame[spec.label].mean():.2%}, "
                  f"{days} day partitions -> {batch_dir} in {time.perf_counter() - started:.1f}s")
    print(cfg.batch_id)


def _with_train_options(command):
    """One `--option` per TrainConfig field, with its default and description: the CLI, the Prefect run
    form and the MLflow params all come from that model, so they cannot disagree. Typer reads options
    from a function's signature, so the signature is built from the model's fields."""
    from sluicegate.train.config import TrainConfig

    own = [p for p in inspect.signature(command).parameters.values() if p.name != "train"]
    hints = {p.name: p.annotation for p in own}
    extra = []
    for name, field in TrainConfig.model_fields.items():
        hints[name] = Annotated[field.annotation, typer.Option(help=field.description)]
        extra.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=field.default,
                                       annotation=hints[name]))

    @functools.wraps(command)
    def wrapper(**kwargs):
        train = {name: kwargs.pop(name) for name in TrainConfig.model_fields}
        return command(train=train, **kwargs)

    wrapper.__signature__ = inspect.Signature(
        [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[p.name]) for p in own] + extra)
    wrapper.__annotations__ = hints
    return wrapper


@app.command()
@_with_train_options
def run(
    train: dict,
    spec: SpecOption = None,
    batch: Annotated[str | None, typer.Option(help="Raw batch id; default: the newest")] = None,
    target: Annotated[str | None, typer.Option(
        help="Where the model will run: cpu, cuda, tensorrt or rocm [SLUICEGATE_TARGET]; default: the hardware "
             "profile's target, else cpu")] = None,
    promote: Annotated[bool, typer.Option(help="Gate and promote now, or only register a challenger")] = True,
) -> None:
    """Run the training pipeline on a batch. Exit 0 done, 3 blocked by a gate, else error."""
    from sluicegate.flows.pipeline import PipelineParams, training_pipeline

    if target is not None:  # through the environment, so `deploy` and the server read the same target
        os.environ["SLUICEGATE_TARGET"] = target
    settings = _settings(spec)
    _check_target(settings)
    _home(settings)
    _check_policy(settings)
    try:
        params = PipelineParams(**train, batch=batch, target=target, promote=promote, actor="cli")
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    started = time.perf_counter()
    result = training_pipeline(params)
    elapsed = time.perf_counter() - started
    _print_outcome(result, settings, elapsed)
    if result["status"] in ("blocked_data", "blocked_model"):
        raise typer.Exit(EXIT_BLOCKED)


def _print_outcome(result: dict, settings: Settings, elapsed: float) -> None:
    status = result["status"]
    if status == "blocked_data":
        console.print(f"\n[bold red]Blocked at validation.[/bold red] {result['reason']} "
                      f"Report: {result['quarantined_to']}/validation_report.md. The champion is untouched.")
    elif status == "blocked_model":
        console.print(f"\n[bold red]Blocked by the model gates.[/bold red] {settings.model_name} "
                      f"v{result['version']} stays challenger: {result['reason']}. "
                      f"Report: {result['gate_report']}")
    elif status == "registered":
        console.print(f"\n[bold]Registered.[/bold] {result['reason']}.")
    elif status == "lost_race":
        console.print(f"\n[yellow]Not promoted.[/yellow] {result['reason']}.")
    elif status == "unchanged":
        console.print(f"\n[bold]Nothing new.[/bold] {result['reason']}.")
    else:
        console.print(f"\n[bold green]Promoted.[/bold green] {settings.model_name} v{result['version']} "
                      f"({result['variant']}) is champion: {result['reason']}. Report: {result['gate_report']}")
    stages, peaks = result.get("stage_seconds") or {}, result.get("stage_peak_gb") or {}
    if stages:
        console.print("Stage times: " + ", ".join(f"{k} {v:.1f}s ({v / elapsed:.0%})" for k, v in stages.items()))
    if peaks:
        console.print("Peak memory: " + ", ".join(f"{k} {v:.2f} GB" for k, v in peaks.items()))
    console.print(f"Pipeline finished in {elapsed:.1f}s. Look at:\n"
                  f"  MLflow UI:    mlflow ui --backend-store-uri {settings.tracking_uri}\n"
                  f"  Data Docs:    expectations/uncommitted/data_docs/local_site/index.html\n"
                  f"  Status:       sluicegate status --json")


@app.command()
def status(
    spec: SpecOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    show_history: Annotated[bool, typer.Option("--history", help="List promotions and rollbacks")] = False,
) -> None:
    """Champion and challenger versions, their metrics and variant, and the last gate decision."""
    from sluicegate.ship import registry

    settings = _settings(spec)
    _home(settings)
    with _registry_answers():
        client = registry.configure(settings)
        info = registry.status(client, settings.model_name)
        if show_history:
            info["history"] = registry.history(client, settings.model_name)
        info["models"] = _registered_models(client)
    from sluicegate.operate import retrains

    info["blocked_retrains"] = retrains.blocked_streak(retrains.ledger_path(settings)).count
    if as_json:
        print(json.dumps(info, indent=2))
        return
    if show_history:
        for event in info["history"]:
            console.print(f"{event['at']}  {event['event']:<8} v{event['previous']} -> v{event['version']}  "
                          f"by {event['actor']}: {event['reason']}")
        return
    for role in ("champion", "challenger"):
        v = info[role]
        if v is None:
            console.print(f"{role}: none")
        else:
            m = v["metrics"]
            console.print(f"{role}: v{v['version']} ({v['variant']}) PR-AUC {m.get('pr_auc', float('nan')):.4f} "
                          f"ECE {m.get('ece', float('nan')):.4f} Server p99 "
                          f"{m.get('server_p99_ms', float('nan')):.3f} ms")
    last = info["last_gate_decision"]
    if last:
        console.print(f"last decision: v{last['version']} {'promote' if last['promote'] else 'block'}: "
                      f"{last['reason']}")
    others = [f"{m['name']} (champion {'v' + m['champion'] if m['champion'] else 'none'})" for m in info["models"]]
    console.print(f"models in this registry: {', '.join(others) or 'none'}")


def _registered_models(client) -> list[dict]:
    """Every table's model in the registry (one per spec), with its champion version."""
    # MLflow answers alias versions as ints here; versions are strings everywhere else in this CLI.
    return [{"name": m.name, "champion": None if (v := (m.aliases or {}).get("champion")) is None else str(v)}
            for m in client.search_registered_models(order_by=["name ASC"])]


@app.command()
def init(
    table: Annotated[Path, typer.Argument(help="A CSV or parquet file")],
    label: Annotated[str | None, typer.Option(help="The label column, when it cannot be told")] = None,
    id_column: Annotated[str | None, typer.Option("--id", help="The unique row id column")] = None,
    timestamp: Annotated[str | None, typer.Option(help="The event-time column")] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write the spec; default: TABLE's name + .spec.yaml")]
    = None,
    name: Annotated[str | None, typer.Option(help="The spec's name; default: from TABLE's file name")] = None,
    gates: Annotated[bool, typer.Option(help="Also draft the table's gates from its label rate and baselines")]
    = True,
) -> None:
    """Draft a dataset spec from a table: dtypes, ranges, categories, null shares, label band, candidate id,
    timestamp, and columns that look like leakage; and its gates file. Review both, then `sluicegate import`."""
    from sluicegate.data import tables

    try:
        draft = tables.infer_spec(tables.read_table(table), name or table.stem, label, id_column, timestamp)
    except tables.TableError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    out = out or table.with_name(f"{table.stem}.spec.yaml")
    project_gates = Settings().gates_path
    if gates and not project_gates.exists():  # the drafted gates start from the project's policy
        console.print(f"- no gates drafted: the project policy {project_gates} is not here (SLUICEGATE_GATES_PATH)")
        gates = False
    if gates:
        from sluicegate.ship.draft_gates import gates_file, write_draft
        draft.spec["gates"] = gates_file(draft.spec["name"])
    out.write_text(draft.to_yaml(table))
    if gates:
        console.print(write_draft(table, out, project_gates))
    for note in draft.notes:
        console.print(f"- {note}")
    console.print(f"init: wrote {out}; review it, then: sluicegate import {table} --spec {out}")
    print(out)


@app.command(name="import")
def import_cmd(
    table: Annotated[Path, typer.Argument(help="A CSV or parquet file")],
    spec: SpecOption = None,
    batch: Annotated[str | None, typer.Option(help="Batch id; default: file name + checksum")] = None,
) -> None:
    """Check a table against its spec and lay it out as a raw batch (by day with a timestamp); the file
    itself is only read, and its checksum recorded."""
    from sluicegate.data import tables

    settings = _settings(spec)
    paths = _home(settings)
    try:
        outcome = tables.import_table(table, settings.spec, paths.raw, batch)
    except tables.TableError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(outcome.summary())
    print(outcome.batch_dir.name)


@app.command(name="labels")
def labels_cmd(
    table: Annotated[Path, typer.Argument(help="A CSV or parquet file: the spec's id and label, optionally "
                                               "labelled_at")],
    spec: SpecOption = None,
    report: Annotated[bool, typer.Option(help="Then print live precision/recall/PR-AUC per label maturity on "
                                              "the prediction log, beside the CBPE estimate")] = False,
    threshold: Annotated[float | None, typer.Option(help="With --report: the decision threshold; default: "
                                                         "the champion's (0.5 without one)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="With --report: end with one JSON object")] = False,
) -> None:
    """Import late labels into SLUICEGATE_HOME/tables/<spec>/labels/ (the file itself is only read)."""
    from datetime import UTC, datetime

    from rich.table import Table

    from sluicegate.operate import labels as lab
    from sluicegate.operate.monitor import read_prediction_log
    from sluicegate.serve.privacy import pseudonyms

    settings = _settings(spec)
    paths = _home(settings)
    try:
        outcome = lab.import_labels(table, settings.spec, paths.labels, datetime.now(UTC))
    except lab.LabelError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(outcome.summary())
    print(outcome.path)
    _label_online_state(settings, outcome.path)
    if not report:
        return
    if threshold is None:
        from sluicegate.ship import registry

        with _registry_answers():
            champion = registry.version_by_alias(registry.configure(settings), settings.model_name,
                                                 registry.CHAMPION)
        threshold = float(champion.tags.get("threshold", 0.5)) if champion is not None else 0.5
    known, quarantined = lab.read_labels(paths.labels, settings.spec, paths.quarantine,
                                         pseudonyms(settings.spec, paths))
    read = read_prediction_log(paths.predictions, None, paths.quarantine / "predictions")
    log = read.frame
    for item in quarantined:
        console.print(f"[yellow]quarantined[/yellow] {item.source} -> {item.path}: {item.reason}")
    for path in read.quarantined:
        console.print(f"[yellow]quarantined unreadable prediction file[/yellow] {path}")
    now = datetime.now(UTC)
    try:
        live = lab.live_performance(log, known, settings.spec, threshold, now)
        preds, labelled = lab.labelled_predictions(log, known, settings.spec, now)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {paths.predictions}: {exc}")
        raise typer.Exit(2) from None
    grid = Table("maturity", "predictions", "labelled", "coverage", "positives", "precision", "recall", "PR-AUC",
                 title=f"Live performance at threshold {threshold:g} ({len(quarantined)} label file(s) quarantined)")
    for row in live.rows():
        grid.add_row(row["maturity"], *(f"{row[k]:,}" for k in ("predictions", "labelled")), lab.fmt(row["coverage"]),
                     f"{row['positives']:,}", *(lab.fmt(row[k]) for k in ("precision", "recall", "pr_auc")))
    console.print(grid)
    console.print(lab.estimate_performance(preds["score"], threshold).summary())
    estimate = lab.estimate_performance(labelled["score"], threshold)
    comparison = lab.compare_estimate(estimate, live)
    console.print(f"on the {estimate.rows:,} labelled ones: " + "; ".join(
        f"{r['metric']} estimated {lab.fmt(r['estimated'])}, measured {lab.fmt(r['measured'])}, "
        f"error {lab.fmt(r['abs_error'])}" for r in comparison))
    if as_json:
        print(json.dumps({"live": live.to_dict(), "estimate": estimate.to_dict(), "comparison": comparison,
                          "quarantined": [str(q.path) for q in quarantined] + read.quarantined}, default=str))


@app.command(name="retrain-reset")
def retrain_reset(
    spec: SpecOption = None,
    actor: Annotated[str | None, typer.Option(help="Who resets (recorded); default: the user name")] = None,
    reason: Annotated[str, typer.Option(help="Why (recorded)")] = "reset by an operator",
) -> None:
    """Let the monitor trigger retrains again after max_blocked_retrains of them in a row were blocked."""
    import getpass

    from sluicegate.operate import retrains

    settings = _settings(spec)
    _home(settings)
    cleared = retrains.reset(retrains.ledger_path(settings), actor or getpass.getuser(), reason)
    console.print(f"cleared a streak of {cleared.count} blocked retrain(s); the monitor may trigger again")


@app.command(name="deploy")
def deploy_cmd(
    spec: SpecOption = None,
    actor: Annotated[str, typer.Option(help="Who is deploying, recorded with the promotion")] = "cli",
) -> None:
    """Gate the newest challenger against the champion and promote it if every gate passes.

    Exit 0: promoted or nothing newer; 3: blocked by a gate; 4: another deploy won; other: error.
    """
    from sluicegate.flows.deploy import deploy_flow

    settings = _settings(spec)
    _check_target(settings)
    _home(settings)
    _check_policy(settings)
    with _registry_answers():
        result = deploy_flow(actor=actor)
    if result["report"]:
        print(result["report"])
    colour = {"promoted": "green", "nothing_newer": "bold", "blocked": "red", "lost_race": "yellow"}[result["status"]]
    console.print(f"[{colour}]{result['status'].replace('_', ' ')}[/{colour}]: {result['reason']}")
    raise typer.Exit(result["exit_code"])


@app.command()
def rollback(
    spec: SpecOption = None,
    to: Annotated[str | None, typer.Option(help="Version to restore; default: the previous champion")] = None,
    actor: Annotated[str, typer.Option(help="Who is rolling back")] = "cli",
    reason: Annotated[str, typer.Option(help="Why, recorded in the history")] = "manual rollback",
) -> None:
    """Restore the previous champion (or --to VERSION) and record it."""
    from sluicegate.flows.deploy import rollback_flow

    settings = _settings(spec)
    _home(settings)
    try:
        with _registry_answers():
            result = rollback_flow(to_version=to, actor=actor, reason=reason)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(f"rolled back {result['model']}: champion v{result['from']} -> v{result['to']}")


@app.command()
def serve(
    specs: Annotated[list[Path] | None, typer.Option(
        "--spec", help="A table's dataset spec; repeat to serve several models from one server (/predict answers "
                       "for the first, /predict/{name} for each) [SLUICEGATE_SPEC_PATH]")] = None,
    host: Annotated[str | None, typer.Option(help="Bind address [SLUICEGATE_SERVE_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [SLUICEGATE_SERVE_PORT]")] = None,
    max_batch_rows: Annotated[int | None, typer.Option(help="Rows per model call at most")] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help="Wait for more requests before a call")] = None,
    poll_interval: Annotated[float | None, typer.Option(help="Seconds between champion checks")] = None,
    workers: Annotated[int | None, typer.Option(help="Server processes; they share the online state "
                                                     "[SLUICEGATE_SERVE_WORKERS]")] = None,
) -> None:
    """Serve MODEL@champion of each spec: Open Inference Protocol v2, /predict, /metrics; hot-reloads champions."""
    from sluicegate.serve import ServeSettings, run

    tables = [_settings(spec) for spec in specs or [None]]
    names = [table.model_name for table in tables]
    if len(set(names)) < len(names):
        console.print(f"[red]error:[/red] --spec: two specs register the same model ({', '.join(names)}); "
                      "give each its own model_name")
        raise typer.Exit(2)
    for table in tables:
        _check_target(table)
        _home(table)
    given = {"host": host, "port": port, "max_batch_rows": max_batch_rows, "max_wait_ms": max_wait_ms,
             "poll_interval_s": poll_interval, "workers": workers}
    serve_settings = ServeSettings(**{k: v for k, v in given.items() if v is not None})
    console.print(f"serving {', '.join(f'{n}@champion' for n in names)} on "
                  f"http://{serve_settings.host}:{serve_settings.port} "
                  f"(v2: /v2/models/{{{'|'.join(names)}}}/infer, /predict, /metrics, /openapi.json)")
    run(tables, serve_settings)


def _label_online_state(settings: Settings, written: Path) -> None:
    """The imported labels onto the online state's events; its outage does not undo the import."""
    import pandas as pd

    from sluicegate.features.online import label_events

    try:
        held = label_events(settings, settings.spec, pd.read_parquet(written))
    except Exception as exc:  # the labels are on disk: the next batch brings them to the state too
        console.print(f"[yellow]warning:[/yellow] online state not updated with the labels: {exc}")
        return
    if held:
        console.print(f"online state: {held:,} held event rows took their label")


@app.command()
def monitor(
    spec: SpecOption = None,
    trigger: Annotated[bool, typer.Option(help="Start training-pipeline through the Prefect API on drift")] = True,
    window_days: Annotated[int, typer.Option(help="Days of newest raw data a triggered retrain uses")] = 14,
) -> None:
    """Drift, data quality and live precision/recall of the prediction log since the last run."""
    from sluicegate.flows.monitor import MonitorParams
    from sluicegate.flows.monitor import monitor as monitor_flow

    settings = _settings(spec)
    _home(settings)
    result = monitor_flow(MonitorParams(trigger=trigger, window_days=window_days))
    colour = {"triggered": "yellow", "checked": "green"}.get(result["status"], "cyan")
    console.print(f"[bold {colour}]monitor: {result['status']}[/bold {colour}]: {result['reason']}")
    if result.get("flow_run_id"):
        console.print(f"training-pipeline flow run: {result['flow_run_id']}")
    print(json.dumps(result, default=str))


@app.command()
def ingest(
    spec: SpecOption = None,
    days: Annotated[int, typer.Option(help="Newest N days of raw partitions to assemble")] = 14,
) -> None:
    """Assemble the newest N days of raw partitions (from any batch) into a window batch; prints its id."""
    from sluicegate.operate import ingest as ingest_mod

    settings = _settings(spec)
    paths = _home(settings)
    try:
        window = ingest_mod.assemble_window(paths.raw, days)
    except ingest_mod.NoPartitionsError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(window.summary())
    print(window.batch_id)
