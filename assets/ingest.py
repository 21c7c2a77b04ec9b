"""The ingest asset: new landing files into the append-only event log."""


from collections import Counter
from pathlib import Path

import dagster as dg

# pandas is imported with the definitions, not inside the ingest step: DuckDB's and pyarrow's
# Python layers import it at a process's first parameter binding or Arrow table (0.25-0.3 s
# that fell inside the step), and the run's validation step needs it in the same process anyway.
import pandas  # noqa: F401
from dagster_duckdb import DuckDBResource

from alliance.ingest import COLUMN_COMMENTS, TABLE_COMMENTS, ingest_files, landing_files
from alliance.pseudonyms import load_key
from orchestration.resources import AllianceSettings
from quality.gx_runner import release_preload
from quality.history import record_check_results

RAW_EVENTS = dg.AssetKey(["raw", "events"])
RAW_FILES = dg.AssetKey(["raw", "ingested_files"])
RAW_QUARANTINE = dg.AssetKey(["raw", "quarantine"])
RAW_REJECTED = dg.AssetKey(["raw", "rejected_files"])

# Written by a data engineer's decision (`alliance reject-file`), not by a pipeline step: an
# external asset, so the graph shows that staging reads it and the CLI reports each rejection.
rejected_files = dg.AssetSpec(
    RAW_REJECTED, kinds={"duckdb"}, group_name="ingest", owners=["team:data-engineering"],
    description="Ingested files rejected after a blocking check failed (alliance reject-file): "
    "their events leave staging.stg_events and every model from the next run. Append-only.",
    metadata={"dagster/table_name": "raw.rejected_files"},
)


class IngestConfig(dg.Config):
    """Which files to ingest; empty means every file in landing/ not ingested yet."""

    files: list[str] = []


def _schema(table: str) -> dg.TableSchema:
    return dg.TableSchema(
        columns=[dg.TableColumn(name, description=doc) for name, doc in COLUMN_COMMENTS.get(table, {}).items()]
    )


def demo_key_file(settings: AllianceSettings) -> Path:
    return settings.paths.secrets / "demo_pseudonym_key"


def pseudonym_key(settings: AllianceSettings) -> bytes:
    """$ALLIANCE_PSEUDONYM_KEY; in demo mode a local key under data/secrets is created."""
    return load_key(demo_key_file(settings) if settings.demo else None)


@dg.multi_asset(
    specs=[
        dg.AssetSpec(RAW_EVENTS, description=TABLE_COMMENTS["raw.events"], kinds={"duckdb"},
                     group_name="ingest", owners=["team:data-engineering"],
                     metadata={"dagster/column_schema": _schema("raw.events"),
                               "dagster/table_name": "raw.events"}),
        dg.AssetSpec(RAW_FILES, description=TABLE_COMMENTS["raw.ingested_files"], kinds={"duckdb"},
                     group_name="ingest", owners=["team:data-engineering"],
                     metadata={"dagster/table_name": "raw.ingested_files"}),
        dg.AssetSpec(RAW_QUARANTINE, description=TABLE_COMMENTS["raw.quarantine"], kinds={"duckdb"},
                     group_name="ingest", owners=["team:data-engineering"],
                     metadata={"dagster/column_schema": _schema("raw.quarantine"),
                               "dagster/table_name": "raw.quarantine"}),
    ],
    check_specs=[dg.AssetCheckSpec(
        "no_unreadable_files", asset=RAW_FILES,
        description="Warns when a file of this run could not be read at all (e.g. a corrupt "
        "gzip): it is recorded as unreadable in raw.ingested_files, with the error, and never "
        "retried; a corrected export (other bytes) is a new file.")],
    pool="duckdb_writer",
    description="Ingest new canonical NDJSON files from landing/ into raw.events; reject to raw.quarantine.",
)
def ingest(
    context: dg.AssetExecutionContext,
    config: IngestConfig,
    duckdb: DuckDBResource,
    settings: AllianceSettings,
):
    """Validate, pseudonymise and append every new landing file; one transaction per file group."""
    p = settings.paths.ensure()
    files = [Path(f) for f in config.files] if config.files else landing_files(p.landing)
    key = pseudonym_key(settings)
    with duckdb.get_connection() as con:
        results = ingest_files(con, files, key, quarantine_dir=p.quarantine,
                               log=context.log.info)
        totals = con.execute(
            "select (select count(*) from raw.events), (select count(*) from "
            "raw.ingested_files), (select count(*) from raw.quarantine)"
        ).fetchone()
        unreadable = [r for r in results if r.status == "unreadable"]
        # check history, for `alliance status` (on this connection: another costs 0.3 s)
        record_check_results(con, context.run.run_id, [{
            "asset": RAW_FILES.path, "check_name": "no_unreadable_files",
            "passed": not unreadable, "severity": "WARN", "unexpected_count": len(unreadable),
            "details": {"file_ids": [r.file_id for r in unreadable]}}])
    new = [r for r in results if r.status == "ingested"]
    reasons: Counter[str] = Counter()
    for r in new:
        reasons.update(r.quarantine_reasons)
    with_rejects = [r for r in new if r.quarantined]
    if with_rejects:
        # One summary line, not one per file: a backfill can touch thousands of files.
        examples = "; ".join(
            f"{Path(r.path).name}: {', '.join(f'{k}={v}' for k, v in sorted(r.quarantine_reasons.items()))}"
            for r in with_rejects[:5]
        )
        context.log.warning(
            f"{sum(r.quarantined for r in with_rejects)} line(s) quarantined in {len(with_rejects)} "
            f"file(s) ({', '.join(f'{k}={v}' for k, v in reasons.most_common())}), e.g. {examples}. "
            "Details in raw.quarantine (file, line, field, reason)."
        )
    for r in unreadable:
        context.log.error(r.error)  # the error names the file
    vanished = [r for r in results if r.status == "vanished"]
    for r in vanished:
        # (not recorded: the next run that lists it ingests it; a landing sensor's run for
        # the same content was already requested, so that is the nightly run)
        context.log.warning(r.error)
    batch = {
        "files_seen": len(results),
        "files_ingested": len(new),
        "files_already_ingested": sum(r.status == "already_ingested" for r in results),
        "files_unreadable": len(unreadable),
        "files_vanished": len(vanished),
        "lines_read": sum(r.lines_read for r in new),
        "accepted": sum(r.accepted for r in new),
        "duplicates": sum(r.duplicates for r in new),
        "quarantined": sum(r.quarantined for r in new),
        "dropped_fields": sum(r.dropped_fields for r in new),
        "file_ids": dg.MetadataValue.json([r.file_id for r in new]),
    }
    yield dg.MaterializeResult(asset_key=RAW_EVENTS, metadata={**batch, "dagster/row_count": totals[0]})
    yield dg.MaterializeResult(asset_key=RAW_FILES, metadata={"dagster/row_count": totals[1],
                                                              "file_ids": batch["file_ids"]})
    yield dg.MaterializeResult(
        asset_key=RAW_QUARANTINE,
        metadata={"dagster/row_count": totals[2], "quarantined_this_run": batch["quarantined"],
                  "by_reason": dg.MetadataValue.json(dict(reasons))},
    )
    names = [Path(r.path).name for r in unreadable]
    yield dg.AssetCheckResult(
        asset_key=RAW_FILES, check_name="no_unreadable_files", passed=not unreadable,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"unreadable_files": len(unreadable), "files": dg.MetadataValue.json(names[:20])},
    )


# On raw/events, which staging and everything after it read: a blocking check blocks what is
# downstream of its asset, and nothing is downstream of raw/ingested_files (so on that asset a
# failure did not stop the publish).
@dg.asset_check(asset=RAW_EVENTS, blocking=True, pool="duckdb_writer",  # writes check history
                description="Every file: lines read = accepted + duplicates + quarantined, its "
                "accepted events are in raw.events and its quarantined lines in raw.quarantine.")
def line_conservation(
    context: dg.AssetCheckExecutionContext, duckdb: DuckDBResource
) -> dg.AssetCheckResult:
    # The run's GX import (quality.checks.GreatExpectationsResource) waited for the ingest, the
    # step Dagster runs just before this one: it starts here, once the ingest step is over. Started
    # at the end of the ingest's own code, its GIL-bound import slowed Dagster's recording of
    # the ingest's results (0.05-0.08 s of the step). (A run that ingests without this check
    # imports GX when a validation first needs it.)
    release_preload()
    with duckdb.get_connection() as con:
        bad = con.execute(
            "select file_name, lines_read, accepted, duplicates, quarantined from raw.ingested_files "
            "where status = 'ingested' and lines_read <> accepted + duplicates + quarantined"
        ).fetchall()
        logged = con.execute(
            "select f.file_name, f.accepted, count(e.event_id) from raw.ingested_files f "
            "left join raw.events e using (file_id) where f.status = 'ingested' "
            "group by f.file_id, f.file_name, f.accepted having f.accepted <> count(e.event_id)"
        ).fetchall()
        # ... and every quarantined line has its row in raw.quarantine (reason, file, line)
        unrecorded = con.execute(
            "select f.file_name, f.quarantined, count(q.line_number) from raw.ingested_files f "
            "left join raw.quarantine q using (file_id) where f.status = 'ingested' "
            "group by f.file_id, f.file_name, f.quarantined having f.quarantined <> count(q.line_number)"
        ).fetchall()
        passed = not bad and not logged and not unrecorded
        # Check history (quality.check_results) on the same connection, for `alliance status`.
        record_check_results(con, context.run.run_id, [{
            "asset": RAW_EVENTS.path, "check_name": "line_conservation", "passed": passed,
            "severity": "ERROR", "unexpected_count": len(bad) + len(logged) + len(unrecorded),
            "details": {"files_failing_identity": len(bad),
                        "files_with_missing_events": len(logged),
                        "files_with_missing_quarantine_rows": len(unrecorded)},
        }])
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"files_failing_identity": len(bad), "files_with_missing_events": len(logged),
                  "files_with_missing_quarantine_rows": len(unrecorded),
                  "examples": dg.MetadataValue.json(
                      [list(map(str, r)) for r in (bad + logged + unrecorded)[:5]])},
    )


def defs() -> dg.Definitions:
    return dg.Definitions(assets=[ingest, rejected_files], asset_checks=[line_conservation])
