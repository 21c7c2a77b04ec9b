"""Check history: every asset-check evaluation as a row in quality.check_results.

Any check may record itself here (the GX suites, the relational SQL checks and the runner's
column tests alike) through `record_check_result`; `failing_checks` answers "what is failing now"
for `alliance status`, and the table itself answers "since when" for trend queries.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb

HISTORY_TABLE = "quality.check_results"

_DDL = """
create schema if not exists quality;
create table if not exists quality.check_results (
    run_id varchar not null,
    asset varchar not null,            -- asset key as 'schema/name'
    check_name varchar not null,
    passed boolean not null,
    severity varchar not null,         -- 'ERROR' | 'WARN'
    unexpected_count bigint,
    evaluated_at timestamptz not null,
    details json                       -- expectation, failing keys (pseudonyms only), notes
);
comment on table quality.check_results is 'Every evaluation of a data quality check (GX suites and SQL checks), one row per check per run, kept for trends; the clinic report reads it. Append-only.';
comment on column quality.check_results.run_id is 'Dagster run that evaluated the check.';
comment on column quality.check_results.asset is 'Asset checked, as schema/name.';
comment on column quality.check_results.check_name is 'Name of the check (docs/quality.md).';
comment on column quality.check_results.passed is 'Whether the check passed.';
comment on column quality.check_results.severity is 'ERROR (blocking) or WARN.';
comment on column quality.check_results.unexpected_count is 'Failures the check found: failing rows of a SQL test or check; for a GX check, failing rows per expectation, summed over its expectations (a row failing two expectations counts twice).';
comment on column quality.check_results.evaluated_at is 'When the check ran.';
comment on column quality.check_results.details is 'The expectation, failing keys (pseudonyms only) and notes, as JSON.';
"""


def ensure_history_table(con: duckdb.DuckDBPyConnection) -> None:
    """Create quality.check_results when it does not exist yet (idempotent)."""
    from alliance.catalog import ensure_table

    ensure_table(con, "quality", "check_results", _DDL)


def record_check_result(
    con: duckdb.DuckDBPyConnection,
    *,
    run_id: str,
    asset: str | Sequence[str],
    check_name: str,
    passed: bool,
    severity: str,
    unexpected_count: int | None = None,
    details: Mapping[str, Any] | None = None,
    evaluated_at: datetime | None = None,
) -> None:
    """Append one check evaluation to quality.check_results.

    `asset` is 'schema/name' or a key path such as ['raw', 'events']; `severity` 'ERROR' or 'WARN'
    (a Dagster AssetCheckSeverity is accepted too). `details` must hold pseudonyms and counts only,
    never raw identifiers or free text: it is stored in the warehouse.
    """
    ensure_history_table(con)
    asset_str = asset if isinstance(asset, str) else "/".join(asset)
    sev = str(getattr(severity, "value", severity)).upper()
    con.execute(
        "insert into quality.check_results values (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            run_id,
            asset_str,
            check_name,
            bool(passed),
            sev,
            None if unexpected_count is None else int(unexpected_count),
            evaluated_at or datetime.now(UTC),
            json.dumps(dict(details or {}), default=str, sort_keys=True),
        ],
    )


def record_check_results(
    con: duckdb.DuckDBPyConnection, run_id: str, results: Sequence[Mapping[str, Any]]
) -> int:
    """Append several check evaluations to quality.check_results in one transaction.

    Each item holds the keyword arguments of `record_check_result` except `run_id` (asset,
    check_name, passed, severity, and optionally unexpected_count, details, evaluated_at). All rows
    land or none do, so a crash never leaves half of one step's checks recorded. When the caller
    already has a transaction open, the rows join it (and commit or roll back with it).
    """
    if not results:
        return 0
    own = True
    try:
        con.execute("begin transaction")
    except duckdb.TransactionException:  # the caller's transaction: ride along with it
        own = False
    try:
        for r in results:
            record_check_result(con, run_id=run_id, **dict(r))
        if own:
            con.execute("commit")
    except BaseException:
        if own:
            con.execute("rollback")
        raise
    return len(results)


def _connect(db: str | os.PathLike[str] | duckdb.DuckDBPyConnection) -> tuple[Any, bool]:
    if isinstance(db, duckdb.DuckDBPyConnection):
        return db, False
    return duckdb.connect(str(Path(db)), read_only=True), True


def _table_exists(con: duckdb.DuckDBPyConnection) -> bool:
    row = con.execute(
        "select count(*) from duckdb_tables() "
        "where schema_name = 'quality' and table_name = 'check_results'"
    ).fetchone()
    return bool(row and row[0])


def latest_results(db: str | os.PathLike[str] | duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
    """The latest evaluation of every (asset, check), with `failing_since` for failing ones."""
    if not isinstance(db, duckdb.DuckDBPyConnection) and not Path(db).exists():
        return []
    con, own = _connect(db)
    try:
        if not _table_exists(con):
            return []
        cur = con.execute(
            """
            with

            ranked as (
                select
                    *,
                    row_number() over (
                        partition by asset, check_name order by evaluated_at desc
                    ) as recency
                from quality.check_results
            ),

            last_pass as (
                select asset, check_name, max(evaluated_at) as last_passed_at
                from quality.check_results
                where passed
                group by all
            ),

            first_failure as (
                -- the first failure after the last pass: how long it has been broken
                select r.asset, r.check_name, min(r.evaluated_at) as failing_since
                from quality.check_results as r
                left join last_pass using (asset, check_name)
                where not r.passed
                    and r.evaluated_at > coalesce(last_pass.last_passed_at, '-infinity'::timestamptz)
                group by all
            )

            select
                ranked.asset, ranked.check_name, ranked.passed, ranked.severity,
                ranked.unexpected_count, ranked.evaluated_at, ranked.run_id, ranked.details,
                case when not ranked.passed then first_failure.failing_since end as failing_since
            from ranked
            left join first_failure using (asset, check_name)
            where ranked.recency = 1
            order by ranked.passed, ranked.severity, ranked.asset, ranked.check_name
            """
        )
        cols = [d[0] for d in cur.description]
        rows = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    finally:
        if own:
            con.close()
    for r in rows:
        r["details"] = json.loads(r["details"]) if r["details"] else {}
    return rows


def failing_check_names(con: duckdb.DuckDBPyConnection, asset: str) -> set[str]:
    """Checks of one asset ('schema/name') whose latest evaluation failed (latest_results for
    one asset, without the rest: it runs before every incremental model's history is written)."""
    if not _table_exists(con):
        return set()
    return {r[0] for r in con.execute(
        "select check_name from quality.check_results where asset = ? "
        "qualify row_number() over (partition by check_name order by evaluated_at desc) = 1 "
        "and not passed", [asset]).fetchall()}


def failing_checks(
    db_path_or_con: str | os.PathLike[str] | duckdb.DuckDBPyConnection,
) -> list[dict[str, Any]]:
    """The checks whose latest evaluation failed, ERROR before WARN, for `alliance status`.

    Each item: asset, check_name, passed (False), severity, unexpected_count, evaluated_at, run_id,
    details (dict), failing_since. A path is opened read-only; a missing history table gives [].
    """
    return [r for r in latest_results(db_path_or_con) if not r["passed"]]


def failing_checks_with_fallback(
    working: str | os.PathLike[str], snapshot: str | os.PathLike[str]
) -> tuple[list[dict[str, Any]], str]:
    """Failing checks from the working warehouse, or from the snapshot while a writer holds it.

    A blocking failure stops publish, so only the working warehouse knows about it: it is opened
    read-only. DuckDB refuses even a read-only connection while another process writes the file
    (IOException, lock) or while this process has it open read-write (ConnectionException); then
    the serving snapshot answers, which may lag by the failing run. Returns (rows, source) with
    source 'warehouse', 'snapshot (warehouse locked by a writer)', 'snapshot' or 'none'.
    """
    if Path(working).exists():
        try:
            con = duckdb.connect(str(Path(working)), read_only=True)
        except (duckdb.IOException, duckdb.ConnectionException) as e:
            from alliance.config import is_duckdb_lock_error

            if isinstance(e, duckdb.IOException) and not is_duckdb_lock_error(e):
                # not a writer's lock: a damaged or foreign file, which the snapshot cannot hide
                reason = str(e).splitlines()[0][:200]
                if Path(snapshot).exists():
                    return failing_checks(snapshot), f"snapshot (warehouse unreadable: {reason})"
                return [], f"none (warehouse unreadable: {reason})"
            # locked by a writer: fall back to the snapshot below
        else:
            try:
                return failing_checks(con), "warehouse"
            finally:
                con.close()
        if Path(snapshot).exists():
            return failing_checks(snapshot), "snapshot (warehouse locked by a writer)"
        return [], "none (warehouse locked by a writer, nothing published)"
    if Path(snapshot).exists():
        return failing_checks(snapshot), "snapshot"
    return [], "none"
