"""Platform tables that are not models (check history, build state, rejections): created with
their documentation once, not on every call."""

from __future__ import annotations

import duckdb


def ensure_table(con: duckdb.DuckDBPyConnection, schema: str, name: str, ddl: str) -> None:
    """Run `ddl` (create if not exists, then its comments) when `schema.name` is missing or a
    column of it has no comment (a warehouse from before its comments existed).

    The callers run on hot paths (before every model build, every check result), and each
    COMMENT ON is a catalog write: one catalog read decides instead.
    """
    columns, undocumented = con.execute(
        "select count(*), count(*) filter (where comment is null) from duckdb_columns() "
        "where database_name = current_database() and schema_name = ? and table_name = ?",
        [schema, name]).fetchone()
    if columns == 0 or undocumented:
        con.execute(ddl)
