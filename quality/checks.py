"""Dagster asset checks for the quality suites: batch contract checks, marts suites, SQL checks.

Every evaluation is also written to quality.check_results (quality/history.py). ERROR checks are
blocking: when one fails, assets downstream of the checked asset do not run in the same run
(publish and reports never see failed data); WARN checks only report.
"""


import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource

from alliance.rejections import rejected_file_ids
from quality.batch import (
    CHUNK_EVENTS,
    Batch,
    default_params,
    implausible_timestamps,
    load_batch,
    mark_validated,
    pending_file_ids,
    plan_chunks,
    validate_chunks,
)
from quality.gx_runner import (
    CheckOutcome,
    SuiteResult,
    build_data_docs,
    defer_preload,
    preload_in_background,
)
from quality.history import record_check_result
from quality.marts import ModelSuite, default_model_suites, model_suites, validate_model
from quality.relational import CHECKS as RELATIONAL_CHECKS
from quality.relational import RelationalCheck, run_check

RAW_EVENTS = dg.AssetKey(["raw", "events"])
DOCS_ENV = "ALLIANCE_QUALITY_DOCS"  # "0" turns GX Data Docs off (e.g. in the benchmark)
GX_RESOURCE_KEY = "gx"


class GreatExpectationsResource(dg.ConfigurableResource):
    """Great Expectations for the GX checks; its 3-6 s import starts early, in the background.

    Dagster initialises the resources of every step of an in-process run before the first step,
    so with `preload` the import runs in a background thread instead of at the start of the
    batch suite's step (measured in docs/quality.md). In a run that also ingests, the import
    waits until the ingest's DuckDB work is done (assets/ingest.py): beside the CPU-bound ingest
    it slowed the ingest by about as much as it saved. Processes that only load definitions (UI,
    daemon, CLI) never initialise it and never import GX.
    """

    preload: bool = True

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if not self.preload:
            return
        if _run_executes_step(context, INGEST_STEP):
            defer_preload()
        else:
            preload_in_background()


INGEST_STEP = "ingest"


def _run_executes_step(context: dg.InitResourceContext, step_key: str) -> bool:
    """Whether this run's execution plan runs the step (False when it cannot be told)."""
    run = context.dagster_run
    if run is None or context.instance is None or not run.execution_plan_snapshot_id:
        return False
    if run.step_keys_to_execute is not None:
        return step_key in run.step_keys_to_execute
    try:
        plan = context.instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
    except Exception:  # noqa: BLE001 - an unreadable plan only means no deferral
        return False
    return any(step.key == step_key for step in plan.steps)


def _severity(sev: str) -> dg.AssetCheckSeverity:
    return dg.AssetCheckSeverity.ERROR if sev.upper() == "ERROR" else dg.AssetCheckSeverity.WARN


def _result(
    asset: dg.AssetKey, outcome: CheckOutcome, severity: str, extra: dict[str, Any] | None = None
) -> dg.AssetCheckResult:
    md: dict[str, Any] = {**outcome.metadata(), **(extra or {})}
    return dg.AssetCheckResult(
        asset_key=asset,
        check_name=outcome.check,
        passed=outcome.passed,
        severity=_severity(severity),
        metadata=md,
    )


TIMESTAMPS_CHECK = "timestamps_plausible"  # the batch suite's WARN rule (quality/suites/batch.yaml)


def _record(con: Any, run_id: str, asset: dg.AssetKey, outcome: CheckOutcome, severity: str,
            extra: dict[str, Any] | None = None) -> None:
    record_check_result(
        con,
        run_id=run_id,
        asset=asset.path,
        check_name=outcome.check,
        passed=outcome.passed,
        severity=severity,
        unexpected_count=outcome.unexpected_count,
        details={**outcome.metadata(), **(extra or {})},
    )


def _docs_dir() -> str | None:
    """Where GX Data Docs go: <data dir>/quality-docs, unless $ALLIANCE_QUALITY_DOCS is "0"."""
    if os.environ.get(DOCS_ENV, "1") == "0":
        return None
    from alliance.config import paths

    return str(paths().quality_docs)


def render_data_docs(log: Any, results: Iterable[SuiteResult | None]) -> Path | None:
    """Add GX validations (batch or marts suites; each once, None skipped) to the Data Docs site.

    Data Docs are a courtesy: a rendering error is a warning, never a failed check.
    """
    docs = _docs_dir()
    stored = list({id(r): r for r in results if r is not None}.values())
    if not docs or not stored:
        return None
    try:
        return build_data_docs(stored, docs)
    except Exception as e:  # noqa: BLE001
        log.warning(f"GX Data Docs not built in {docs}: {e}")
        return None


def run_file_ids(context: dg.AssetCheckExecutionContext, asset: dg.AssetKey = RAW_EVENTS) -> list[int]:
    """The file_ids the ingest put in this run's raw/events materialization metadata (or [])."""
    event = context.instance.get_latest_materialization_event(asset)
    if event is None or event.run_id != context.run.run_id or event.asset_materialization is None:
        return []
    value = event.asset_materialization.metadata.get("file_ids")
    value = getattr(value, "value", value)
    return [int(v) for v in value] if isinstance(value, list) else []


# ---------------------------------------------------------------- raw/events batch suite


def batch_checks(asset: dg.AssetKey = RAW_EVENTS) -> dg.AssetChecksDefinition:
    """The batch suite on raw/events: one check per quality/suites/batch.yaml check."""
    params = default_params()
    specs = [
        dg.AssetCheckSpec(
            name=name,
            asset=asset,
            blocking=sev == "ERROR",
            description=f"{params.docs.get(name, '')} (GX batch suite, severity {sev})",
            metadata={"severity": sev, "suite": "quality/suites/batch.yaml"},
        )
        for name, sev in params.severities.items()
    ]

    @dg.multi_asset_check(
        specs=specs,
        name="raw_events_batch_suite",
        pool="duckdb_writer",  # it writes quality.check_results and quality.validated_batches
        description="Great Expectations contract checks on the events this run ingested "
        "(and any ingested file not validated yet).",
    )
    def _check(context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource,
               gx: GreatExpectationsResource) -> Iterator[dg.AssetCheckResult]:
        # `gx` is required so that the GX import starts with the run (see the resource).
        run_id = context.run.run_id
        # Plan the chunks, then read one chunk at a time and release the (single-writer) database
        # while GX works on it; memory follows the chunk (CHUNK_EVENTS), not the batch.
        with duckdb.get_connection() as con:
            ids = sorted((set(run_file_ids(context, asset)) | set(pending_file_ids(con)))
                         - rejected_file_ids(con))
            chunks = plan_chunks(con, ids, CHUNK_EVENTS) if ids else []

        def load(chunk: Sequence[int]) -> Batch:
            with duckdb.get_connection() as con:
                return load_batch(con, chunk)

        validation = validate_chunks(load, chunks, params=params)
        to_mark = [validation]  # which verdict each file gets in quality.validated_batches
        if not validation.rows:
            validation.notes = ["no new events"]
        # The one WARN rule, over the whole log: this run validated only new (or blocked) files,
        # and a passing evaluation of them must not read as "passed" while an earlier file's
        # implausible events are still in the log (they stay until the file is rejected).
        plausible = validation.checks.get(TIMESTAMPS_CHECK)
        if plausible is not None and plausible.passed:
            with duckdb.get_connection() as con:
                n, keys = implausible_timestamps(con, params, rejected_file_ids(con))
            if n:
                validation.checks[TIMESTAMPS_CHECK] = CheckOutcome(
                    TIMESTAMPS_CHECK, False, n,
                    ["events of earlier runs are still implausible (whole log, rejected files "
                     "aside)"], keys, plausible.expectations_evaluated)
        extra = {"file_ids": ", ".join(map(str, ids)) or "none", "rows_validated": validation.rows,
                 "validation_seconds": round(validation.seconds, 3)}
        if validation.notes:
            extra["notes"] = "; ".join(validation.notes)
        if validation.blocking_failures:
            # The events are in the append-only log: the files stay blocked, run after run,
            # until a data engineer decides (docs/operations.md, "A blocking batch check failed").
            # Only the files with failing rows are to be rejected: all of them (GX's complete
            # index list), or, for an expectation without row locations, the failing keys' files.
            named = sorted({f for name in validation.blocking_failures
                            for f in validation.checks[name].failing_files}
                           | {int(k.split()[0].removeprefix("file_id="))
                              for name in validation.blocking_failures
                              for k in validation.checks[name].failing_keys
                              if k.startswith("file_id=")})
            extra["files_with_failing_rows"] = ", ".join(map(str, named)) or "see failing_keys"
            # The verdict is the batch's; the other files get their own, from one more
            # validation without the named files (only when something blocking failed): clean,
            # they stop being pending instead of waiting for the named files' rejection.
            rest = [i for i in ids if i not in named]
            if named and rest:
                with duckdb.get_connection() as con:
                    rest_chunks = plan_chunks(con, rest, CHUNK_EVENTS)
                cleared = validate_chunks(load, rest_chunks, params=params)
                if not cleared.blocking_failures:
                    to_mark = [cleared, dataclasses.replace(validation, file_ids=named)]
            extra["remedy"] = ("reject the files with failing rows (files_with_failing_rows, every "
                               "file with a failing row; the failing keys list the first rows): alliance reject-file <file_id> "
                               "--reason <code>, then re-send a corrected export. Until then they "
                               "are re-checked and block every run (the batch's other files were "
                               "validated apart and stay pending only if they failed too)")
        with duckdb.get_connection() as con:
            for v in to_mark:
                mark_validated(con, v, run_id)
            for name, outcome in validation.checks.items():
                _record(con, run_id, asset, outcome, params.severities[name], extra)
        render_data_docs(context.log, validation.suite_results)
        for name, outcome in validation.checks.items():
            yield _result(asset, outcome, params.severities[name], extra)

    return _check


# ---------------------------------------------------------------- checks on tables


@dataclass(frozen=True)
class InlineCheck:
    """A quality check on a table: its Dagster specs, the tables it reads, and how to run it.

    The checks on SQL models run inside the models step (assets/sql_models.py): the models build
    in one Dagster step, so a check in a step of its own could only run after every model, and
    its blocking would no longer stop the models built on the table it found broken. Run inline,
    right after the models it reads are built and before any model downstream of its asset, an
    ERROR failure stops those descendants as a failing column test does, and the failed step
    keeps publish from running. `check_step` wraps one as a step of its own (for tables that are
    not models).
    """

    asset: tuple[str, ...]  # the table it checks
    severity: str  # ERROR (blocking) | WARN
    specs: tuple[dg.AssetCheckSpec, ...]
    requires: frozenset[tuple[str, ...]]  # tables that must be built first (asset included)
    run: Callable[[Any], dict[str, CheckOutcome]]  # connection -> outcome per check name
    label: str

    def record(self, con: Any, run_id: str, outcomes: dict[str, CheckOutcome]) -> None:
        """Write the outcomes to quality.check_results (for `alliance status` and reports)."""
        asset = dg.AssetKey(list(self.asset))
        for o in outcomes.values():
            _record(con, run_id, asset, o, self.severity)

    def results(self, outcomes: dict[str, CheckOutcome],
                selected: set[dg.AssetCheckKey]) -> list[dg.AssetCheckResult]:
        """The Dagster check results of the selected checks."""
        asset = dg.AssetKey(list(self.asset))
        return [_result(asset, o, self.severity) for o in outcomes.values()
                if dg.AssetCheckKey(asset, o.check) in selected]


def suite_check(suite: ModelSuite) -> InlineCheck:
    """The GX marts suite of one model (all its checks ERROR, blocking)."""
    asset = (suite.schema, suite.name)
    return InlineCheck(
        asset=asset, severity="ERROR",
        specs=tuple(dg.AssetCheckSpec(
            name=c, asset=dg.AssetKey(list(asset)), blocking=True,
            description=f"GX marts suite on {suite.table} (severity ERROR)",
            metadata={"suite": "quality/suites/marts.yaml"}) for c in suite.checks),
        requires=frozenset({asset}),
        run=lambda con: validate_model(con, suite),
        label=f"Great Expectations suite on {suite.table}.")


def relational_check(chk: RelationalCheck,
                     known: set[tuple[str, ...]] | None = None) -> InlineCheck:
    """One relational SQL check; it waits for the tables it reads that are in `known` (all when
    None), when they are built in the same run."""
    required = {tuple(t.split(".")) for t in chk.requires}
    if known is not None:
        required &= known
    deps = [dg.AssetKey(list(t)) for t in sorted(required - {chk.asset})]
    return InlineCheck(
        asset=chk.asset, severity=chk.severity,
        specs=(dg.AssetCheckSpec(
            name=chk.name, asset=dg.AssetKey(list(chk.asset)),
            blocking=chk.severity == "ERROR", additional_deps=deps,
            description=f"{chk.description} (SQL, severity {chk.severity})"),),
        requires=frozenset(required | {chk.asset}),
        run=lambda con: {chk.name: run_check(con, chk)},
        label=f"SQL checks: {chk.name} on {'.'.join(chk.asset)}.")


def check_step(chk: InlineCheck, name: str, gx: bool = False) -> dg.AssetChecksDefinition:
    """`chk` as a Dagster step of its own; `gx` requires the GX resource (starts its import)."""

    @dg.multi_asset_check(specs=list(chk.specs), name=name, can_subset=True,
                          description=chk.label,
                          required_resource_keys={"duckdb"} | ({GX_RESOURCE_KEY} if gx else set()))
    def _check(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
        selected = set(context.selected_asset_check_keys)
        if not any(s.key in selected for s in chk.specs):
            return
        with context.resources.duckdb.get_connection() as con:
            outcomes = chk.run(con)
            chk.record(con, context.run.run_id, outcomes)
        render_data_docs(context.log, [o.suite_result for o in outcomes.values()])
        yield from chk.results(outcomes, selected)

    return _check


def marts_checks(suites: Iterable[ModelSuite] | None = None) -> list[dg.AssetChecksDefinition]:
    """The marts suites as steps of their own, one per model (the project runs them inline)."""
    return [check_step(suite_check(s), f"{s.schema}_{s.name}_marts_suite", gx=True)
            for s in (default_model_suites() if suites is None else suites)]


def relational_checks(
    checks: Sequence[RelationalCheck] = RELATIONAL_CHECKS,
    existing_assets: set[tuple[str, ...]] | None = None,
) -> list[dg.AssetChecksDefinition]:
    """The SQL checks whose asset exists (all of them when `existing_assets` is None), one step
    per check."""
    return [check_step(relational_check(c, existing_assets), f"{'__'.join(c.asset)}_{c.name}")
            for c in checks if existing_assets is None or c.asset in existing_assets]


def model_inline_checks(models: dict[str, Any]) -> list[InlineCheck]:
    """The GX marts suites and relational SQL checks whose asset is one of `models`."""
    keys = {tuple(m.key_path) for m in models.values()}
    return [suite_check(s) for s in model_suites(models)] + [
        relational_check(c, keys) for c in RELATIONAL_CHECKS if c.asset in keys]


def _model_assets(models: dict[str, Any]) -> set[tuple[str, ...]]:
    keys: set[tuple[str, ...]] = {tuple(m.key_path) for m in models.values()}
    return keys | {("raw", "events"), ("raw", "ingested_files"), ("raw", "quarantine")}


def defs() -> dg.Definitions:
    """The quality checks of the repository's assets, for orchestration/definitions.py."""
    from alliance.sqlrunner import discover_models

    # Parsed once for both uses: discovering the models (sqlglot + YAML sidecars) is most of the
    # cost of this function (~0.7 s per call on the dev container).
    models = discover_models()
    model_keys = {tuple(m.key_path) for m in models.values()}
    # Checks on SQL models run inside the models step (model_inline_checks, used by
    # assets/sql_models.py); only the checks on raw/* tables are steps of their own here.
    return dg.Definitions(
        asset_checks=[
            batch_checks(),
            *relational_checks(checks=[c for c in RELATIONAL_CHECKS if c.asset not in model_keys],
                               existing_assets=_model_assets(models)),
        ],
        resources={GX_RESOURCE_KEY: GreatExpectationsResource()},
    )
