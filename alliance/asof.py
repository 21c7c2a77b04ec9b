"""As-of rebuilds: the projections exactly as they were when the platform knew only up to a time.

The event log is append-only and every event carries `recorded_at` (when the platform learned it).
Corrections are later events, so cutting the log at a `recorded_at` and rebuilding the SQL models
reproduces every table as it was at that moment. The rebuild writes a separate DuckDB file
(`data/asof/<stamp>/alliance.duckdb`): the working warehouse and the serving snapshot are never
touched, and the file is self-contained (raw rows after the cutoff are not even copied), so an
analyst or a report can open it later without setting anything.

No Dagster imports: the as-of job, the CLI and the tests call `build_as_of`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from alliance import sqlrunner

# raw tables with a recorded_at column are cut at the cutoff; seeds are copied whole. File
# rejections (alliance.rejections) are cut at their rejected_at: a rejection made after the
# cutoff was not known then.
RAW_TABLES = ("events", "ingested_files", "quarantine", "rejected_files")
CUT_COLUMNS = {"rejected_files": "rejected_at", "check_results": "evaluated_at"}
# The check history as evaluated by the cutoff, so a report rebuilt as of a date shows the check
# state it showed then ("failing checks" section), not "no check history".
QUALITY_TABLES = ("check_results",)
COPIED_SCHEMAS = ("seeds",)


class AsOfError(ValueError):
    """An as-of request that cannot be served (bad timestamp, missing warehouse)."""


@dataclass(frozen=True)
class AsOfResult:
    """The as-of database that was built."""

    path: Path
    as_of: datetime
    raw_counts: dict[str, int]
    models: dict[str, int]  # schema.name -> row count


def parse_as_of(value: str | datetime) -> datetime:
    """A cutoff as an aware UTC datetime; a naive value is taken as UTC.

    Accepts ISO-8601 (`2026-03-01`, `2026-03-01T12:00:00+01:00`, `...Z`).
    """
    if isinstance(value, datetime):
        ts = value
    else:
        text = value.strip()
        try:
            ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as e:
            raise AsOfError(
                f"as_of {value!r} is not an ISO-8601 time (e.g. 2026-03-01T00:00:00+00:00)"
            ) from e
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC)


def as_of_dir(data_root: Path | str, as_of: datetime) -> Path:
    """The folder for one cutoff: data/asof/<YYYYMMDDTHHMMSSZ>/."""
    return Path(data_root) / "asof" / as_of.strftime("%Y%m%dT%H%M%SZ")


def _quote(ident: str) -> str:
    return '"' + ident.replace('"', '""') + '"'


def _copy_source(
    source: duckdb.DuckDBPyConnection, target_path: Path, as_of: datetime
) -> dict[str, int]:
    """Copy raw rows recorded by the cutoff and all seeds from `source` into a new file."""
    alias = "asof_target"
    source.execute(f"attach '{target_path.as_posix()}' as {alias}")
    counts: dict[str, int] = {}
    try:
        tables = source.execute(
            "select schema_name, table_name, "
            "  list(column_name) filter (where column_name in "
            "    ('recorded_at', 'rejected_at', 'evaluated_at')) as has_rec "
            "from duckdb_columns() where database_name = current_database() "
            "and schema_name in ('raw', 'seeds', 'quality') group by 1, 2 order by 1, 2"
        ).fetchall()
        for schema, table, has_rec in tables:
            if schema == "raw" and table not in RAW_TABLES:
                continue
            if schema == "quality" and table not in QUALITY_TABLES:
                continue
            source.execute(f"create schema if not exists {alias}.{_quote(schema)}")
            where = ""
            params: list[object] = []
            if has_rec:
                where = f" where {CUT_COLUMNS.get(table, 'recorded_at')} <= ?"
                params = [as_of]
            src = f"{_quote(schema)}.{_quote(table)}"
            dst = f"{alias}.{_quote(schema)}.{_quote(table)}"
            source.execute(f"create or replace table {dst} as select * from {src}{where}", params)
            counts[f"{schema}.{table}"] = int(
                source.execute(f"select count(*) from {dst}").fetchone()[0]
            )
    finally:
        source.execute(f"detach {alias}")
    if "raw.events" not in counts:
        raise AsOfError("the warehouse has no raw.events table; ingest something first")
    return counts


def build_as_of(
    source: duckdb.DuckDBPyConnection,
    out_path: Path | str,
    as_of: str | datetime,
    *,
    select: Sequence[str] | None = None,
    sql_dir: Path | str | None = None,
) -> AsOfResult:
    """Rebuild the SQL models as of `as_of` into a new DuckDB file at `out_path`.

    `source` is a connection to the working warehouse (the caller holds it; in Dagster it is the
    duckdb resource inside the writer pool). An existing file at `out_path` is replaced, so
    re-running the same cutoff gives the same file.
    """
    cutoff = parse_as_of(as_of)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".building")
    for p in (tmp, Path(str(tmp) + ".wal")):
        p.unlink(missing_ok=True)
    raw_counts = _copy_source(source, tmp, cutoff)
    con = duckdb.connect(str(tmp))
    try:
        # Staging views read raw.events through getvariable('as_of'); setting it makes the views
        # agree with the tables even if someone later queries them with a wider raw copy.
        # (The session time zone is left at its default, as in the pipeline's own builds, so
        # date truncations agree with the original tables.)
        con.execute(f"set variable as_of = '{cutoff.isoformat()}'::timestamptz")
        results = sqlrunner.run_models(con, select, sql_dir=sql_dir, upstream=select is not None)
        con.execute("create schema if not exists meta")
        con.execute(
            "create or replace table meta.as_of_build as select ?::timestamptz as as_of, "
            "now() as built_at",
            [cutoff],
        )
        con.execute("checkpoint")
    finally:
        con.close()
    os.replace(tmp, out_path)
    return AsOfResult(path=out_path, as_of=cutoff, raw_counts=raw_counts,
                      models={r.model.fqn: r.row_count for r in results})


def read_as_of(path: Path | str) -> datetime | None:
    """The cutoff an as-of file was built for (None for a normal warehouse or snapshot)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        has_build = con.execute(
            "select count(*) from duckdb_tables() where schema_name = 'meta' "
            "and table_name = 'as_of_build'"
        ).fetchone()[0]
        row = con.execute("select as_of from meta.as_of_build limit 1").fetchone() if has_build else None
    finally:
        con.close()
    return row[0] if row else None
