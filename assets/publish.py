"""The serving snapshot: publish the warehouse for analysts and reports, atomically, after checks.

`serving/snapshot` depends on the raw event log and on every core and mart model, so a failed
blocking check on any of them (in the same run) skips the publish and the previous snapshot stays.
The copy itself is `alliance.snapshot.publish_from_connection`: checkpoint, copy to a new file,
verify, rename into place, keep `settings.snapshot_keep` older snapshots in serving/history/.
"""

import dagster as dg

from alliance import snapshot
from alliance.config import SQL_DIR
from orchestration.instance import WRITER_POOL
from orchestration.partitions import add_clinic_partitions


def _upstream_keys() -> list[dg.AssetKey]:
    # Model keys are `<schema>/<file name>` (assets/sql_models.py); listing the files is enough
    # and avoids parsing every model's SQL a second time when the definitions load.
    keys = [dg.AssetKey(["raw", "events"])]
    for schema in ("core", "marts"):
        for sql in sorted((SQL_DIR / schema).glob("*.sql")):
            keys.append(dg.AssetKey([schema, sql.stem.lower()]))
    return keys


@dg.asset(
    key=["serving", "snapshot"],
    group_name="publish",
    deps=_upstream_keys(),
    kinds={"duckdb"},
    pool=WRITER_POOL,
    owners=["team:data-engineering"],
    required_resource_keys={"duckdb", "settings"},
    description=(
        "The read-only snapshot analysts and reports open: serving/alliance.duckdb, a complete "
        "copy of the warehouse swapped in atomically after every blocking check passed. Older "
        "snapshots are kept in serving/history/ (settings.snapshot_keep, $ALLIANCE_SNAPSHOT_KEEP)."
    ),
)
def serving_snapshot(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    """Publish the working warehouse as the new serving snapshot."""
    settings = context.resources.settings
    data = settings.paths
    serving = data.serving
    for left in snapshot.clean_incoming(serving, context.resources.duckdb.database):
        context.log.warning(f"removed {left}, left by a publish that did not finish")
    with context.resources.duckdb.get_connection() as con:
        info = snapshot.publish_from_connection(
            con, context.resources.duckdb.database, serving, keep=settings.snapshot_keep
        )
    context.log.info(
        f"published {serving} ({info.bytes / 1e6:.1f} MB, {info.tables} tables, data version "
        f"{info.data_version}); history keeps {settings.snapshot_keep}, pruned {len(info.pruned)}"
        + ("; same data as the previous snapshot, which it replaces in history"
           if info.superseded else "")
    )
    # The report partitions follow the data: every clinic in the new snapshot gets a partition.
    new_clinics = add_clinic_partitions(context.instance, serving)
    if new_clinics:
        context.log.info(f"new clinic report partitions: {new_clinics}")
    marts = {k: v for k, v in info.row_counts.items() if k.startswith(("marts.", "core."))}
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(serving)),
            "history_path": dg.MetadataValue.path(str(info.history_path)),
            "published_at": info.published_at.isoformat(),
            "data_version": info.data_version or "",
            "replaced_same_data_in_history": info.superseded is not None,
            "bytes": info.bytes,
            "tables": info.tables,
            "events": info.row_counts.get("raw.events", 0),
            "row_counts": dg.MetadataValue.json(marts),
            "pruned": len(info.pruned),
            "new_clinics": len(new_clinics),
        }
    )


def defs() -> dg.Definitions:
    return dg.Definitions(assets=[serving_snapshot])
