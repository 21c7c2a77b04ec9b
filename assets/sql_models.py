"""Dagster assets for the dbt-like SQL models: one asset per `.sql` file, one check per test.

All models build in one subsettable step (`models_asset`), in dependency order.

The models are discovered when the definitions load, so adding `dbt_like_sql/<schema>/<name>.sql`
(and its `.yml` sidecar) adds the asset `<schema>/<name>` with its checks; its upstream assets are
the tables its SQL reads (parsed by `alliance.sqlrunner`), never declared here.
"""

import graphlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from alliance import sqlrunner
from alliance.config import REPO_ROOT
from quality.checks import InlineCheck, model_inline_checks, render_data_docs
from quality.gx_runner import SuiteResult
from quality.history import failing_check_names, record_check_results

# As-of rebuilds never touch the working warehouse: asof_job (orchestration/jobs.py) builds them in
# a separate file, so nothing of the past can be published by mistake.
POOL = "duckdb_writer"  # DuckDB allows one writer per file: cap concurrent writers via this pool
# Run tag that makes every model rebuild fully (nightly_rebuild_job sets it: the safety net
# against drift). Without it models build incrementally where their state allows
# (alliance.sqlrunner.plan_build), as in ingest_job for one new landing file.
FULL_REFRESH_TAG = "alliance/full_refresh"


def wants_full_refresh(tags: dict[str, str]) -> bool:
    """Whether a run's tags ask for a full rebuild of the SQL models."""
    return str(tags.get(FULL_REFRESH_TAG, "")).lower() in ("true", "1", "yes")


def _column_schema(model: sqlrunner.Model) -> dg.TableSchema:
    return dg.TableSchema(columns=[
        dg.TableColumn(name=c.name, type=c.data_type or "unknown", description=c.description or None)
        for c in model.columns
    ])


def _check_specs(model: sqlrunner.Model) -> list[dg.AssetCheckSpec]:
    key = dg.AssetKey(list(model.key_path))
    return [
        dg.AssetCheckSpec(
            name=t.check_name,
            asset=key,
            description=f"{t.description} (severity {t.severity})",
            # An error-severity failure stops downstream models in the same run.
            blocking=t.severity == "error",
            metadata={"test": t.test, "severity": t.severity, "sql": t.failing_sql},
        )
        for t in model.tests
    ]


def _relpath(path: Path) -> str:
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _spec(model: sqlrunner.Model) -> dg.AssetSpec:
    metadata: dict[str, object] = {
        "dagster/table_name": model.fqn,
        "materialized": model.materialized,
        "sql_file": dg.MetadataValue.path(_relpath(model.path)),
    }
    if model.columns:
        metadata["dagster/column_schema"] = _column_schema(model)
    if model.error is not None:
        metadata["error"] = str(model.error)
    return dg.AssetSpec(
        key=dg.AssetKey(list(model.key_path)),
        deps=[dg.AssetKey(list(d)) for d in model.deps],
        group_name=model.schema,
        kinds={"duckdb", "sql"},
        owners=["team:data-engineering"],
        description=model.description or f"SQL model {model.fqn} ({_relpath(model.path)}).",
        metadata=metadata,
        code_version=model.code_version,
        # not built when an upstream model failed a blocking test in the same step
        skippable=True,
    )


def _plan(models: dict[str, sqlrunner.Model],
          checks: Sequence[InlineCheck]) -> list[tuple[str, object]]:
    """Models and inline checks in one order: a check after the models it reads and before
    every model downstream of the model it checks (so a failure can still stop them)."""
    sqlrunner.topological_order(models)  # a cycle among the models is an error naming a file
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    parents: dict[str, list[str]] = {}
    children: dict[str, list[str]] = {}
    for fqn, model in models.items():
        parents[fqn] = [f"{s}.{n}" for s, n in model.deps if f"{s}.{n}" in models]
        sorter.add(fqn, *parents[fqn])
        for u in parents[fqn]:
            children.setdefault(u, []).append(fqn)
    for i, chk in enumerate(checks):
        node = f"check:{i}"
        required = [".".join(r) for r in chk.requires if ".".join(r) in models]
        sorter.add(node, *required)
        # A child waits for the check unless the check reads it or something built from it
        # (that child must be built first; the check then cannot stop it).
        upstream_of_check: set[str] = set()
        todo = list(required)
        while todo:
            m = todo.pop()
            if m not in upstream_of_check:
                upstream_of_check.add(m)
                todo.extend(parents[m])
        for child in children.get(".".join(chk.asset), []):
            if child not in upstream_of_check:
                sorter.add(child, node)
    order = list(sorter.static_order())
    return [("check", checks[int(n[6:])]) if n.startswith("check:") else ("model", models[n])
            for n in order]


def models_asset(models: dict[str, sqlrunner.Model], name: str = "sql_models",
                 inline_checks: Sequence[InlineCheck] = ()) -> dg.AssetsDefinition:
    """One Dagster step that builds the selected SQL models in dependency order.

    Every model keeps its own asset (key, group, description, column schema, code version) and
    every column test its own asset check; only the step is shared, as dagster-dbt does for a
    dbt project. One step instead of one per model: each Dagster step costs a few tenths of a
    second of fixed work (events, a warehouse connection), which an incremental run for one
    landing file spent mostly on that (docs/benchmark.md). The quality checks on models
    (`inline_checks`: GX marts suites, relational SQL checks) run in the same step, right after
    the models they read. A model whose upstream model failed a blocking (error) test or check
    in this step is not built, and the step then fails, so nothing downstream of it (publish)
    runs either.
    """
    plan = _plan(models, inline_checks)
    order = [m.fqn for kind, m in plan if kind == "model"]

    @dg.multi_asset(
        name=name,
        specs=[_spec(models[fqn]) for fqn in order],
        check_specs=[c for fqn in order for c in _check_specs(models[fqn])]
        + [spec for chk in inline_checks for spec in chk.specs],
        can_subset=True,
        pool=POOL,
    )
    def _build(context: dg.AssetExecutionContext, duckdb: DuckDBResource) -> Iterator[object]:
        selected = set(context.selected_asset_keys)
        selected_checks = set(context.selected_asset_check_keys)
        incremental = not wants_full_refresh(context.run.tags)
        blocked: dict[str, str] = {}  # model fqn -> the model whose failure stopped it
        built_now: set[str] = set()
        errors: list[str] = []
        unreported: list[str] = []  # failed error tests that are not selected checks
        gx_results: list[SuiteResult | None] = []  # marts suites' validations, for Data Docs
        with duckdb.get_connection() as con:
            for kind, item in plan:
                if kind == "check":
                    chk: InlineCheck = item  # type: ignore[assignment]
                    target = ".".join(chk.asset)
                    if (target not in built_now
                            or not any(s.key in selected_checks for s in chk.specs)
                            or any(".".join(r) in blocked for r in chk.requires)):
                        continue
                    outcomes = chk.run(con)
                    chk.record(con, context.run.run_id, outcomes)
                    gx_results.extend(o.suite_result for o in outcomes.values())
                    if chk.severity == "ERROR" and not all(o.passed for o in outcomes.values()):
                        blocked[target] = target
                    yield from chk.results(outcomes, selected_checks)
                    continue
                model: sqlrunner.Model = item  # type: ignore[assignment]
                fqn = model.fqn
                key = dg.AssetKey(list(model.key_path))
                if key not in selected:
                    continue
                upstream = [f"{s}.{n}" for s, n in model.deps if f"{s}.{n}" in blocked]
                if upstream:
                    blocked[fqn] = blocked[upstream[0]]
                    context.log.warning(f"{fqn} not built: upstream {blocked[fqn]} failed a "
                                        "blocking test or check in this run")
                    continue
                try:
                    built = sqlrunner.build_model(con, model, incremental=incremental)
                except sqlrunner.ModelError as e:
                    blocked[fqn] = fqn
                    errors.append(str(e))
                    context.log.error(str(e))
                    continue
                built_now.add(fqn)
                # Every test runs, selected as a check or not: a job may leave the column
                # tests out of its selection (ingest_job does, to save two Dagster events per
                # test per run) but not the protection. An incremental build's tests check the
                # rebuilt rows (docs/sql-models.md).
                results = sqlrunner.run_tests(con, model, scope=built.test_scope)
                results = _whole_model_failures(con, model, results, built.test_scope)
                # Check history (quality.check_results), in one transaction on the connection
                # the tests ran on, so `alliance status` and the report see column tests too.
                record_check_results(con, context.run.run_id,
                                     [_history_row(model, r) for r in
                                      _recordable(con, model, results, built.test_scope)])
                failed = [r for r in results if not r.passed and r.test.severity == "error"]
                if failed:
                    blocked[fqn] = fqn
                    # next run: a full build that tests every row again, not only new keys
                    sqlrunner.invalidate_state(con, model)
                    unreported.extend(f"{fqn}: {r.test.check_name}" for r in failed
                                      if dg.AssetCheckKey(key, r.test.check_name) not in selected_checks)
                for w in built.warnings:
                    context.log.warning(w)
                yield dg.MaterializeResult(
                    asset_key=key,
                    metadata={**_materialization_metadata(model, built), **_tests_summary(results)},
                    check_results=[_check_result(r, key) for r in results
                                   if dg.AssetCheckKey(key, r.test.check_name) in selected_checks],
                )
        # One Data Docs render for the step's GX marts suites (after the connection is closed:
        # GX keeps its own files under <data dir>/quality-docs).
        render_data_docs(context.log, gx_results)
        if errors or unreported:
            raise dg.Failure(description="\n".join(
                (["SQL model(s) failed to build:"] + errors if errors else [])
                + (["Blocking column tests failed (quality.check_results has them):"] + unreported
                   if unreported else [])))

    return _build


def _tests_summary(results: list[sqlrunner.TestResult]) -> dict[str, object]:
    """Materialization metadata that sums up a model's column tests in this run."""
    failed = [r.test.check_name for r in results if not r.passed]
    return {"tests_run": len(results), "tests_failed": len(failed),
            **({"tests_failing": ", ".join(failed)} if failed else {})}


def column_test_check_keys(sql_dir: Path | str | None = None) -> list[dg.AssetCheckKey]:
    """The asset check keys of every model column test (for job selections)."""
    return [dg.AssetCheckKey(dg.AssetKey(list(m.key_path)), t.check_name)
            for m in sqlrunner.discover_models(sql_dir).values() for t in m.tests]


def _materialization_metadata(model: sqlrunner.Model, built: sqlrunner.BuildResult) -> dict:
    return {
        "dagster/row_count": built.row_count,
        "dagster/column_schema": dg.TableSchema(columns=[
            dg.TableColumn(name=name, type=dtype,
                           description=next((c.description for c in model.columns
                                             if c.name == name), None) or None)
            for name, dtype in built.columns
        ]),
        "seconds": round(built.seconds, 3),
        "build_mode": built.mode,
        "build_reason": built.reason,
        **({"keys_rebuilt": built.keys_rebuilt, "rows_rebuilt": built.rows_rebuilt}
           if built.keys_rebuilt is not None else {}),
        "tests_scope": "rebuilt rows" if built.test_scope else "whole model",
    }


def _check_result(r: sqlrunner.TestResult, key: dg.AssetKey) -> dg.AssetCheckResult:
    metadata: dict[str, object] = {"failing_rows": r.failing}
    if r.sample_keys:
        # keys are the model's key column (pseudonyms), never free text
        metadata["failing_keys"] = ", ".join(r.sample_keys)
    if r.error:
        metadata["error"] = r.error
    return dg.AssetCheckResult(
        asset_key=key,
        check_name=r.test.check_name,
        passed=r.passed,
        severity=(dg.AssetCheckSeverity.ERROR if r.test.severity == "error"
                  else dg.AssetCheckSeverity.WARN),
        metadata=metadata,
    )


def _whole_model_failures(con, model: sqlrunner.Model, results: list[sqlrunner.TestResult],
                          scope: str | None) -> list[sqlrunner.TestResult]:
    """A test that fails on an incremental build's rebuilt rows, counted over the whole model.

    The scoped count says how many rebuilt rows fail, not how many rows do: recorded as it was,
    a second orphan replaced the first in the history ("1 rows" with only the new key). Failures
    are rare and the count is one query, so the check history and the Dagster result carry the
    whole model's count and keys; passing tests keep their cheap scoped evaluation.
    """
    if scope is None:
        return results
    failing = [r.test.check_name for r in results if not r.passed and r.error is None]
    if not failing:
        return results
    whole = {r.test.check_name: r for r in sqlrunner.run_tests(con, model, failing)}
    return [whole.get(r.test.check_name, r) for r in results]


def _recordable(con, model: sqlrunner.Model, results: list[sqlrunner.TestResult],
                scope: str | None) -> list[sqlrunner.TestResult]:
    """The results to record in the check history.

    An incremental build tests only its rebuilt rows, so a warning-level test that passes there
    says nothing about the rows it did not rebuild: it does not overwrite a failure on record
    (a failing relationships test read "passed" after every run whose new events missed the
    orphan row, and its failing_since started again). A whole-model evaluation (a full build)
    records the recovery. Error-level failures force the next build to be full anyway.
    """
    if scope is None:
        return results
    failing = failing_check_names(con, "/".join(model.key_path))
    return [r for r in results
            if not (r.passed and r.test.severity != "error" and r.test.check_name in failing)]


def _history_row(model: sqlrunner.Model, r: sqlrunner.TestResult) -> dict[str, object]:
    """One column test's result as a quality.check_results row (keyword args, run id aside)."""
    details: dict[str, object] = {"test": r.test.test, "column": r.test.column,
                                  "source": "sql model column test"}
    if r.sample_keys:
        details["failing_keys"] = ", ".join(r.sample_keys)  # the model's key: pseudonyms
    if r.error:
        details["error"] = r.error
    return {
        "asset": list(model.key_path),
        "check_name": r.test.check_name,
        "passed": r.passed,
        "severity": "ERROR" if r.test.severity == "error" else "WARN",
        # -1 means the test query itself failed; the count is unknown then
        "unexpected_count": r.failing if r.failing >= 0 else None,
        "details": details,
    }


def model_assets(sql_dir: Path | str | None = None) -> list[dg.AssetsDefinition]:
    """The models found under sql_dir (default: the repo's dbt_like_sql/), as one step, with
    the quality checks on them (quality/checks.py `model_inline_checks`)."""
    models = sqlrunner.discover_models(sql_dir)
    return [models_asset(models, inline_checks=model_inline_checks(models))] if models else []


def defs() -> dg.Definitions:
    """Every SQL model asset with its checks."""
    return dg.Definitions(assets=model_assets())
