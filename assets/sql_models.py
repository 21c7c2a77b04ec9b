"""Dagster assets for the dbt-like SQL models: one asset per `.sql` file, one check per test.

The models are discovered when the definitions load, so adding `dbt_like_sql/<schema>/<name>.sql`
(and its `.yml` sidecar) adds the asset `<schema>/<name>` with its checks; its upstream assets are
the tables its SQL reads (parsed by `alliance.sqlrunner`), never declared here.
"""

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from alliance import sqlrunner
from alliance.config import REPO_ROOT
from quality.history import record_check_results

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


def model_asset(model: sqlrunner.Model) -> dg.AssetsDefinition:
    """The Dagster asset that builds one SQL model and runs its tests as asset checks."""
    metadata: dict[str, object] = {
        "dagster/table_name": model.fqn,
        "materialized": model.materialized,
        "sql_file": dg.MetadataValue.path(_relpath(model.path)),
    }
    if model.columns:
        metadata["dagster/column_schema"] = _column_schema(model)
    if model.error is not None:
        metadata["error"] = str(model.error)

    @dg.asset(
        key=dg.AssetKey(list(model.key_path)),
        deps=[dg.AssetKey(list(d)) for d in model.deps],
        group_name=model.schema,
        kinds={"duckdb", "sql"},
        description=model.description or f"SQL model {model.fqn} ({_relpath(model.path)}).",
        metadata=metadata,
        check_specs=_check_specs(model),
        code_version=model.code_version,
        pool=POOL,
    )
    def _build(context: dg.AssetExecutionContext, duckdb: DuckDBResource) -> Iterator[object]:
        selected = {k.name for k in context.selected_asset_check_keys}
        incremental = not wants_full_refresh(context.run.tags)
        with duckdb.get_connection() as con:
            built = sqlrunner.build_model(con, model, incremental=incremental)
            # an incremental build's tests check the rebuilt rows (docs/sql-models.md)
            results = sqlrunner.run_tests(con, model, selected, scope=built.test_scope)
            # Check history (quality.check_results), in one transaction on the connection the
            # tests ran on, so `alliance status` and the report see column tests too.
            record_check_results(con, context.run.run_id,
                                 [_history_row(model, r) for r in results])
        for w in built.warnings:
            context.log.warning(w)
        yield dg.MaterializeResult(
            metadata={
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
            },
            check_results=[_check_result(r) for r in results],
        )

    return _build


def _check_result(r: sqlrunner.TestResult) -> dg.AssetCheckResult:
    metadata: dict[str, object] = {"failing_rows": r.failing}
    if r.sample_keys:
        # keys are the model's key column (pseudonyms), never free text
        metadata["failing_keys"] = ", ".join(r.sample_keys)
    if r.error:
        metadata["error"] = r.error
    return dg.AssetCheckResult(
        check_name=r.test.check_name,
        passed=r.passed,
        severity=(dg.AssetCheckSeverity.ERROR if r.test.severity == "error"
                  else dg.AssetCheckSeverity.WARN),
        metadata=metadata,
    )


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
    """One asset per model found under sql_dir (default: the repo's dbt_like_sql/)."""
    return [model_asset(m) for m in sqlrunner.discover_models(sql_dir).values()]


def defs() -> dg.Definitions:
    """Every SQL model asset with its checks."""
    return dg.Definitions(assets=model_assets())
