"""Dagster asset checks for the quality suites: batch contract checks, marts suites, SQL checks.

Every evaluation is also written to quality.check_results (quality/history.py). ERROR checks are
blocking: when one fails, assets downstream of the checked asset do not run in the same run
(publish and reports never see failed data); WARN checks only report.
"""


import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import dagster as dg
from dagster_duckdb import DuckDBResource

from quality.batch import (
    CHUNK_EVENTS,
    Batch,
    default_params,
    load_batch,
    mark_validated,
    pending_file_ids,
    plan_chunks,
    validate_chunks,
)
from quality.gx_runner import CheckOutcome, build_data_docs, preload_in_background
from quality.history import record_check_result
from quality.marts import ModelSuite, default_model_suites, validate_model
from quality.relational import CHECKS as RELATIONAL_CHECKS
from quality.relational import RelationalCheck, run_check

RAW_EVENTS = dg.AssetKey(["raw", "events"])
DOCS_ENV = "ALLIANCE_QUALITY_DOCS"  # "0" turns GX Data Docs off (e.g. in the benchmark)
GX_RESOURCE_KEY = "gx"


class GreatExpectationsResource(dg.ConfigurableResource):
    """Great Expectations for the GX checks; its 3-6 s import starts when the run starts.

    Dagster initialises the resources of every step of an in-process run before the first step,
    so with `preload` the import runs in a background thread while the ingest works in DuckDB
    (measured in docs/quality.md) instead of at the start of the batch suite's step. Processes
    that only load definitions (UI, daemon, CLI) never initialise it and never import GX.
    """

    preload: bool = True

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if self.preload:
            preload_in_background()


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
        description="Great Expectations contract checks on the events this run ingested "
        "(and any ingested file not validated yet).",
    )
    def _check(context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource,
               gx: GreatExpectationsResource) -> Iterator[dg.AssetCheckResult]:
        run_id = context.run.run_id
        # Plan the chunks, then read one chunk at a time and release the (single-writer) database
        # while GX works on it; memory follows the chunk (CHUNK_EVENTS), not the batch.
        with duckdb.get_connection() as con:
            ids = sorted(set(run_file_ids(context, asset)) | set(pending_file_ids(con)))
            chunks = plan_chunks(con, ids, CHUNK_EVENTS) if ids else []

        def load(chunk: Sequence[int]) -> Batch:
            with duckdb.get_connection() as con:
                return load_batch(con, chunk)

        validation = validate_chunks(load, chunks, params=params)
        if not validation.rows:
            validation.notes = ["no new events"]
        extra = {"file_ids": ", ".join(map(str, ids)) or "none", "rows_validated": validation.rows,
                 "validation_seconds": round(validation.seconds, 3)}
        if validation.notes:
            extra["notes"] = "; ".join(validation.notes)
        with duckdb.get_connection() as con:
            mark_validated(con, validation, run_id)
            for name, outcome in validation.checks.items():
                _record(con, run_id, asset, outcome, params.severities[name], extra)
        docs = _docs_dir()
        if docs and validation.suite_results:
            try:
                build_data_docs(validation.suite_results, docs)
            except Exception as e:  # Data Docs are a courtesy: never fail a check over rendering
                context.log.warning(f"GX Data Docs not built in {docs}: {e}")
        for name, outcome in validation.checks.items():
            yield _result(asset, outcome, params.severities[name], extra)

    return _check


# ---------------------------------------------------------------- marts suites


def marts_checks(suites: Iterable[ModelSuite] | None = None) -> list[dg.AssetChecksDefinition]:
    """One multi-check per model of quality/suites/marts.yaml (all ERROR, blocking)."""
    out = []
    for suite in (default_model_suites() if suites is None else suites):
        asset = dg.AssetKey([suite.schema, suite.name])
        specs = [dg.AssetCheckSpec(name=c, asset=asset, blocking=True,
                                   description=f"GX marts suite on {suite.table} (severity ERROR)",
                                   metadata={"suite": "quality/suites/marts.yaml"})
                 for c in suite.checks]

        def _make(suite: ModelSuite = suite, asset: dg.AssetKey = asset,
                  specs: list[dg.AssetCheckSpec] = specs) -> dg.AssetChecksDefinition:
            @dg.multi_asset_check(specs=specs, name=f"{suite.schema}_{suite.name}_marts_suite",
                                  description=f"Great Expectations suite on {suite.table}.")
            def _check(context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource,
                       gx: GreatExpectationsResource) -> Iterator[dg.AssetCheckResult]:
                with duckdb.get_connection() as con:
                    outcomes = validate_model(con, suite)
                    for o in outcomes.values():
                        _record(con, context.run.run_id, asset, o, "ERROR")
                for o in outcomes.values():
                    yield _result(asset, o, "ERROR")

            return _check

        out.append(_make())
    return out


# ---------------------------------------------------------------- relational SQL checks


def relational_checks(
    checks: Sequence[RelationalCheck] = RELATIONAL_CHECKS,
    existing_assets: set[tuple[str, ...]] | None = None,
) -> list[dg.AssetChecksDefinition]:
    """The SQL checks whose asset exists (all of them when `existing_assets` is None)."""
    out = []
    for chk in checks:
        if existing_assets is not None and chk.asset not in existing_assets:
            continue
        asset = dg.AssetKey(list(chk.asset))
        # Wait for the other tables the query reads when they are built in the same run.
        deps = [dg.AssetKey(t.split(".")) for t in chk.requires
                if tuple(t.split(".")) != chk.asset
                and (existing_assets is None or tuple(t.split(".")) in existing_assets)]

        def _make(chk: RelationalCheck = chk, asset: dg.AssetKey = asset,
                  deps: list[dg.AssetKey] = deps) -> dg.AssetChecksDefinition:
            @dg.asset_check(asset=asset, name=chk.name, blocking=chk.severity == "ERROR",
                            description=f"{chk.description} (SQL, severity {chk.severity})",
                            additional_deps=deps)
            def _check(context: dg.AssetCheckExecutionContext,
                       duckdb: DuckDBResource) -> dg.AssetCheckResult:
                with duckdb.get_connection() as con:
                    outcome = run_check(con, chk)
                    _record(con, context.run.run_id, asset, outcome, chk.severity)
                return _result(asset, outcome, chk.severity)

            return _check

        out.append(_make())
    return out


def _model_assets() -> set[tuple[str, ...]]:
    from alliance.sqlrunner import discover_models

    keys: set[tuple[str, ...]] = {tuple(m.key_path) for m in discover_models().values()}
    return keys | {("raw", "events"), ("raw", "ingested_files"), ("raw", "quarantine")}


def defs() -> dg.Definitions:
    """The quality checks of the repository's assets, for orchestration/definitions.py."""
    existing = _model_assets()
    return dg.Definitions(
        asset_checks=[
            batch_checks(),
            *marts_checks(),
            *relational_checks(existing_assets=existing),
        ],
        resources={GX_RESOURCE_KEY: GreatExpectationsResource()},
    )
