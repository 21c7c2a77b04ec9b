"""Dagster asset checks for the quality suites: batch contract checks, marts suites, SQL checks.

Every evaluation is also written to quality.check_results (quality/history.py). ERROR checks are
blocking: when one fails, assets downstream of the checked asset do not run in the same run
(publish and reports never see failed data); WARN checks only report.
"""


import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
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
from quality.marts import ModelSuite, default_model_suites, model_suites, validate_model
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
        # `gx` is required so that the GX import starts with the run (see the resource).
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


# ---------------------------------------------------------------- fewer steps, same blocking


def _descendants(models: dict[str, Any]) -> dict[tuple[str, ...], frozenset[tuple[str, ...]]]:
    """Every SQL model's downstream models (transitively), from the deps the runner parsed."""
    children: dict[tuple[str, ...], set[tuple[str, ...]]] = {}
    for m in models.values():
        for dep in m.deps:
            children.setdefault(tuple(dep), set()).add(tuple(m.key_path))
    out: dict[tuple[str, ...], frozenset[tuple[str, ...]]] = {}
    for m in models.values():
        seen: set[tuple[str, ...]] = set()
        todo = [tuple(m.key_path)]
        while todo:
            for c in children.get(todo.pop(), ()):
                if c not in seen:
                    seen.add(c)
                    todo.append(c)
        out[tuple(m.key_path)] = frozenset(seen)
    return out


def step_groups(assets: Sequence[tuple[str, ...]], models: dict[str, Any] | None
                ) -> list[list[tuple[str, ...]]]:
    """Group checked assets whose checks can share one Dagster step without changing blocking.

    Dagster fails a check step when any blocking check in it fails, and then skips everything
    downstream of every asset the step checks. Checks of assets with the same set of downstream
    models therefore block exactly what they blocked as separate steps (and neither asset can be
    upstream of the other), so they share a step: each step costs ~0.1-0.25 s of event-log
    writes on the platform's SQLite instance (docs/quality.md). Without `models`, one group per
    asset. The non-SQL assets (publish, exports, reports) read marts, and
    tests/test_quality.py checks the groups against the whole project graph.
    """
    if models is None:
        return [[a] for a in dict.fromkeys(assets)]
    down = _descendants(models)
    groups: dict[Any, list[tuple[str, ...]]] = {}
    for a in dict.fromkeys(assets):
        key = down.get(a, a)  # an asset that is not a model keeps a step of its own
        groups.setdefault(key, []).append(a)
    return list(groups.values())


def _group_name(assets: Sequence[tuple[str, ...]], suffix: str) -> str:
    if len(assets) == 1:
        return f"{'__'.join(assets[0])}_{suffix}"
    if len(assets) == 2:
        return f"{assets[0][0]}__{assets[0][-1]}_{assets[1][-1]}_{suffix}"
    return f"{assets[0][0]}__{assets[0][-1]}_and_{len(assets) - 1}_more_{suffix}"


# ---------------------------------------------------------------- marts suites


def marts_checks(suites: Iterable[ModelSuite] | None = None,
                 models: dict[str, Any] | None = None) -> list[dg.AssetChecksDefinition]:
    """The marts suites (all ERROR, blocking): one step per model, or per `step_groups` group."""
    by_asset = {(s.schema, s.name): s for s in (default_model_suites() if suites is None
                                                 else suites)}
    out = []
    for group in step_groups(list(by_asset), models):
        members = [by_asset[a] for a in group]
        specs = [dg.AssetCheckSpec(name=c, asset=dg.AssetKey([s.schema, s.name]), blocking=True,
                                   description=f"GX marts suite on {s.table} (severity ERROR)",
                                   metadata={"suite": "quality/suites/marts.yaml"})
                 for s in members for c in s.checks]
        name = (f"{members[0].schema}_{members[0].name}_marts_suite" if len(members) == 1
                else _group_name(group, "marts_suites"))

        def _make(members: list[ModelSuite] = members, specs: list[dg.AssetCheckSpec] = specs,
                  name: str = name) -> dg.AssetChecksDefinition:
            @dg.multi_asset_check(specs=specs, name=name, can_subset=True,
                                  description="Great Expectations suite on "
                                  + ", ".join(s.table for s in members) + ".")
            def _check(context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource,
                       gx: GreatExpectationsResource) -> Iterator[dg.AssetCheckResult]:
                # `gx` is required so that the GX import starts with the run (see the resource).
                selected = context.selected_asset_check_keys
                for suite in members:
                    asset = dg.AssetKey([suite.schema, suite.name])
                    if not any(k.asset_key == asset for k in selected):
                        continue
                    with duckdb.get_connection() as con:
                        outcomes = validate_model(con, suite)
                        for o in outcomes.values():
                            _record(con, context.run.run_id, asset, o, "ERROR")
                    for o in outcomes.values():
                        if dg.AssetCheckKey(asset, o.check) in selected:
                            yield _result(asset, o, "ERROR")

            return _check

        out.append(_make())
    return out


# ---------------------------------------------------------------- relational SQL checks


def relational_checks(
    checks: Sequence[RelationalCheck] = RELATIONAL_CHECKS,
    existing_assets: set[tuple[str, ...]] | None = None,
    models: dict[str, Any] | None = None,
) -> list[dg.AssetChecksDefinition]:
    """The SQL checks whose asset exists (all of them when `existing_assets` is None).

    One step per checked asset, or per `step_groups` group of assets when `models` is given.
    WARN checks block nothing, so they share one step whatever their assets.
    """
    todo = [c for c in checks if existing_assets is None or c.asset in existing_assets]
    blocking = [c for c in todo if c.severity == "ERROR"]
    warn = [c for c in todo if c.severity != "ERROR"]
    batches = [[c for c in blocking if c.asset in g]
               for g in step_groups([c.asset for c in blocking], models)]
    if warn:
        batches += [warn] if models is not None else [[c] for c in warn]
    out = []
    for batch in batches:
        specs = []
        for chk in batch:
            # Wait for the other tables the query reads when they are built in the same run.
            deps = [dg.AssetKey(t.split(".")) for t in chk.requires
                    if tuple(t.split(".")) != chk.asset
                    and (existing_assets is None or tuple(t.split(".")) in existing_assets)]
            specs.append(dg.AssetCheckSpec(
                name=chk.name, asset=dg.AssetKey(list(chk.asset)),
                blocking=chk.severity == "ERROR", additional_deps=deps,
                description=f"{chk.description} (SQL, severity {chk.severity})"))
        assets = list(dict.fromkeys(c.asset for c in batch))
        name = (f"{'__'.join(batch[0].asset)}_{batch[0].name}" if len(batch) == 1
                else _group_name(assets, "checks"))

        def _make(batch: list[RelationalCheck] = batch, specs: list[dg.AssetCheckSpec] = specs,
                  name: str = name) -> dg.AssetChecksDefinition:
            @dg.multi_asset_check(specs=specs, name=name, can_subset=True,
                                  description="SQL checks: " + ", ".join(
                                      f"{c.name} on {'.'.join(c.asset)}" for c in batch) + ".")
            def _check(context: dg.AssetCheckExecutionContext,
                       duckdb: DuckDBResource) -> Iterator[dg.AssetCheckResult]:
                selected = context.selected_asset_check_keys
                results = []
                with duckdb.get_connection() as con:
                    for chk in batch:
                        asset = dg.AssetKey(list(chk.asset))
                        if dg.AssetCheckKey(asset, chk.name) not in selected:
                            continue
                        outcome = run_check(con, chk)
                        _record(con, context.run.run_id, asset, outcome, chk.severity)
                        results.append(_result(asset, outcome, chk.severity))
                yield from results

            return _check

        out.append(_make())
    return out


# ---------------------------------------------------------------- checks inside the models step


@dataclass(frozen=True)
class InlineCheck:
    """A quality check on a SQL model, run inside the models step (assets/sql_models.py).

    The models build in one Dagster step, so a check in a step of its own could only run after
    every model, and its blocking would no longer stop the models built on the table it found
    broken. Run inline, right after the models it reads are built and before any model
    downstream of its asset, an ERROR failure stops those descendants as a failing column test
    does, and the failed step keeps publish from running.
    """

    asset: tuple[str, ...]  # the model it checks
    severity: str  # ERROR (blocking) | WARN
    specs: tuple[dg.AssetCheckSpec, ...]
    requires: frozenset[tuple[str, ...]]  # models that must be built first (asset included)
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


def model_inline_checks(models: dict[str, Any]) -> list[InlineCheck]:
    """The GX marts suites and relational SQL checks whose asset is one of `models`."""
    keys = {tuple(m.key_path) for m in models.values()}
    out: list[InlineCheck] = []
    for suite in model_suites(models):
        asset = (suite.schema, suite.name)
        out.append(InlineCheck(
            asset=asset, severity="ERROR",
            specs=tuple(dg.AssetCheckSpec(
                name=c, asset=dg.AssetKey(list(asset)), blocking=True,
                description=f"GX marts suite on {suite.table} (severity ERROR)",
                metadata={"suite": "quality/suites/marts.yaml"}) for c in suite.checks),
            requires=frozenset({asset}),
            run=lambda con, suite=suite: validate_model(con, suite),
            label=f"GX marts suite on {suite.table}"))
    for chk in RELATIONAL_CHECKS:
        if chk.asset not in keys:
            continue
        required = {tuple(t.split(".")) for t in chk.requires} & keys
        deps = [dg.AssetKey(list(t)) for t in sorted(required - {chk.asset})]
        out.append(InlineCheck(
            asset=chk.asset, severity=chk.severity,
            specs=(dg.AssetCheckSpec(
                name=chk.name, asset=dg.AssetKey(list(chk.asset)),
                blocking=chk.severity == "ERROR", additional_deps=deps,
                description=f"{chk.description} (SQL, severity {chk.severity})"),),
            requires=frozenset(required | {chk.asset}),
            run=lambda con, chk=chk: {chk.name: run_check(con, chk)},
            label=f"SQL check {chk.name} on {'.'.join(chk.asset)}"))
    return out


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
                               existing_assets=_model_assets(models), models=models),
        ],
        resources={GX_RESOURCE_KEY: GreatExpectationsResource()},
    )
