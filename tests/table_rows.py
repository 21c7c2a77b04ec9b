"""Test helper: a table's rows in a comparable form (two builds of the same data may differ in
the last bits of a double, because parallel aggregation sums in no fixed order)."""

from __future__ import annotations

import duckdb


def table_rows(con: duckdb.DuckDBPyConnection, schema: str, name: str,
               catalog: str | None = None) -> list[tuple]:
    """Every row of `schema.name` (in `catalog`, default the current database), sorted, doubles
    rounded to 9 decimals and JSON as text."""
    db = catalog or con.execute("select current_database()").fetchone()[0]
    cols = con.execute(
        "select column_name, data_type from duckdb_columns() where database_name = ? "
        "and schema_name = ? and table_name = ? order by column_index",
        [db, schema, name]).fetchall()
    sel = ", ".join(f'round("{c}", 9)' if t in ("DOUBLE", "FLOAT") else
                    (f'"{c}"::varchar' if t == "JSON" else f'"{c}"') for c, t in cols)
    return con.execute(f'select {sel} from "{db}"."{schema}"."{name}" order by all').fetchall()
