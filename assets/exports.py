"""Parquet export of the published marts and core tables, for BI tools and other engines.

Reads the serving snapshot (never the working warehouse, so it sees only checked data and never
blocks the pipeline's writer) and writes ``<data>/exports/parquet/<schema>/<table>/``. Tables
with a ``clinic_id`` are Hive-partitioned by clinic (one folder per clinic, so access can be
granted per clinic) and, when they carry a month column (a DATE named ``month`` or ``*_month``),
by that month too: BI tools then prune files by clinic and period. Other tables are one file.
The new export is built beside the old one and swapped in by rename, so readers never see a
half-written export. ``_manifest.json`` lists tables, columns, row counts and partition keys,
and names the snapshot it was made from (data version, publish time).
"""


import json
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb

EXPORT_SCHEMAS = ("marts", "core")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def export_parquet(serving_db: Path, out_dir: Path,
                   schemas: tuple[str, ...] = EXPORT_SCHEMAS) -> dict[str, Any]:
    """Export every table/view of `schemas` from a DuckDB file to Parquet; returns the manifest."""
    if not serving_db.exists():
        raise FileNotFoundError(
            f"{serving_db}: no serving snapshot yet; materialise serving/snapshot first")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    tables: list[dict[str, Any]] = []
    try:
        con = duckdb.connect(str(serving_db), read_only=True)
        try:
            from alliance.snapshot import data_version

            # Which snapshot this export is: an export is refreshed by the nightly run, while
            # a landed file publishes a new snapshot at once, so the two can differ for a while
            # (`alliance status` compares them).
            source_snapshot = {
                "data_version": data_version(con),
                "published_at": datetime.fromtimestamp(serving_db.stat().st_mtime, UTC).isoformat(),
            }
            schema_list = ", ".join(f"'{s}'" for s in schemas)
            rels = con.execute(
                f"""select table_schema, table_name from information_schema.tables
                    where table_schema in ({schema_list}) order by 1, 2"""
            ).fetchall()
            for schema, table in rels:
                cols = con.execute(
                    """select column_name, data_type from information_schema.columns
                       where table_schema = ? and table_name = ? order by ordinal_position""",
                    [schema, table],
                ).fetchall()
                names = {c for c, _ in cols}
                month = next((c for c, t in cols if t == "DATE"
                              and (c == "month" or c.endswith("_month"))), None)
                parts = (["clinic_id"] if "clinic_id" in names else []) + (
                    [month] if month and "clinic_id" in names else [])
                rows = con.execute(f"select count(*) from {_q(schema)}.{_q(table)}").fetchone()[0]
                target = staging / schema / table
                target.parent.mkdir(parents=True, exist_ok=True)
                src = f"(select * from {_q(schema)}.{_q(table)})"
                if parts and rows:
                    by = ", ".join(_q(p) for p in parts)
                    con.execute(f"copy {src} to '{target}' (format parquet, partition_by ({by}), "
                                "compression zstd)")
                else:
                    target.mkdir()
                    con.execute(f"copy {src} to '{target / 'data.parquet'}' "
                                "(format parquet, compression zstd)")
                tables.append({"table": f"{schema}.{table}", "rows": rows,
                               "partition_by": parts if rows else [],
                               "columns": [{"name": c, "type": t} for c, t in cols]})
        finally:
            con.close()
        manifest = {"exported_at": datetime.now(UTC).isoformat(), "source": str(serving_db),
                    "snapshot": source_snapshot, "tables": tables}
        (staging / "_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        # Swap: old export aside, new one in, old one removed (readers see old or new, not half).
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        if out_dir.exists():
            out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


@dg.asset(
    key=["exports", "parquet"],
    group_name="exports",
    deps=[dg.AssetKey(["serving", "snapshot"])],
    kinds={"duckdb", "parquet"},
    owners=["team:data-engineering"],
    required_resource_keys={"settings"},
    description=(
        "Parquet copy of the published marts and core tables for BI tools and other engines: "
        "data/exports/parquet/<schema>/<table>/, partitioned by clinic_id (and month where the "
        "table has a month column); _manifest.json lists tables, columns and row counts."
    ),
)
def parquet_export(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Export the serving snapshot's marts and core tables to Parquet."""
    data = context.resources.settings.paths
    out = data.root / "exports" / "parquet"
    manifest = export_parquet(data.serving, out)
    rows = {t["table"]: t["rows"] for t in manifest["tables"]}
    context.log.info(f"exported {len(rows)} tables to {out}")
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(out)),
        "tables": len(rows),
        "rows": sum(rows.values()),
        "row_counts": dg.MetadataValue.json(rows),
        "snapshot_data_version": manifest["snapshot"]["data_version"],
        "partitioned": dg.MetadataValue.json(
            {t["table"]: t["partition_by"] for t in manifest["tables"] if t["partition_by"]}),
    })


def defs() -> dg.Definitions:
    return dg.Definitions(assets=[parquet_export])
