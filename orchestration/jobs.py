"""Jobs: the named runs sensors, schedules and the CLI launch (ingest, nightly rebuild, reports, as-of).

Every job here runs its steps in one process, one after another (`in_process_executor`): DuckDB
allows one writer process per file, SQL model steps are short, and spawning a Python process per
step would cost more than the step. Writer jobs also carry the `alliance/writer` run tag, which the
instance limits to one run at a time (see orchestration/instance.py), so a run's publish never
copies a warehouse another run is half-way through updating.
"""

from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,
)

from alliance import asof as asof_lib
from assets.sql_models import column_test_check_keys
from orchestration.instance import WRITER_POOL
from orchestration.partitions import report_partitions

WRITER_TAG = "alliance/writer"
LANDING_FILE_TAG = "alliance/landing_file"
LANDING_SHA_TAG = "alliance/sha256"

INGEST_KEYS = [dg.AssetKey(["raw", "events"]), dg.AssetKey(["raw", "ingested_files"]),
               dg.AssetKey(["raw", "quarantine"])]
# Groups whose assets write the working warehouse; reports and exports only read.
WAREHOUSE_GROUPS = ("ingest", "seeds", "staging", "core", "marts", "publish")

_writer_tags = {WRITER_TAG: "true"}
INGEST_OP = "ingest"  # the op name of the ingest multi-asset (assets/ingest.py)


def ingest_run_config(files: list) -> dict:  # list of str | Path
    """Run config that makes the ingest asset read exactly these files (absolute paths)."""
    return {"ops": {INGEST_OP: {"config": {"files": [str(Path(f).resolve()) for f in files]}}}}


ingest_job = dg.define_asset_job(
    name="ingest_job",
    # The models' column tests still run in this job (on the rebuilt rows) and land in
    # quality.check_results; a failing error test stops its descendants and fails the step. They
    # are left out of the selection only as Dagster check events: two events per test per run
    # (planned, evaluated), each a SQLite commit in the instance, cost more than the incremental
    # build itself (docs/benchmark.md). nightly_rebuild_job reports every test as a check.
    selection=dg.AssetSelection.groups(*WAREHOUSE_GROUPS)
    - dg.AssetSelection.checks(*column_test_check_keys()),
    description=(
        "Ingest landing files, then update seeds, staging, core and marts (incrementally: only the "
        "episodes the new events touch), run their checks (model column tests are recorded in "
        "quality.check_results and summed up on each materialization) and "
        "publish the serving snapshot if no blocking check failed. Launched by landing_sensor (one "
        "run per new or changed file, tag alliance/landing_file) and by `alliance ingest PATH`."
    ),
    tags=_writer_tags,
    executor_def=dg.in_process_executor,
)

nightly_rebuild_job = dg.define_asset_job(
    name="nightly_rebuild_job",
    selection=dg.AssetSelection.all() - dg.AssetSelection.groups("reports"),
    description=(
        "Full rebuild: ingest anything left in landing/, rebuild every table from the event log, "
        "run all checks, publish, refresh exports. Scheduled nightly; also `alliance run`."
    ),
    # full rebuild of every SQL model, never incremental (assets/sql_models.py)
    tags={**_writer_tags, "alliance/full_refresh": "true"},
    executor_def=dg.in_process_executor,
)

publish_job = dg.define_asset_job(
    name="publish_job",
    selection=dg.AssetSelection.groups("publish"),
    description="Publish the current warehouse as serving/alliance.duckdb (no rebuild).",
    tags=_writer_tags,
    executor_def=dg.in_process_executor,
)


def reports_job_for(partitions_def: dg.PartitionsDefinition | None) -> UnresolvedAssetJobDefinition:
    """The clinic report job (clinic x month partitions; reads only the serving snapshot)."""
    return dg.define_asset_job(
        name="reports_job",
        selection=dg.AssetSelection.groups("reports"),
        partitions_def=partitions_def,
        description=(
            "Render monthly clinic reports from the serving snapshot. The schedule starts one run "
            "per clinic on the 1st for the previous month; a partition range "
            "(`dg launch --job reports_job --partition-range 'C1|2025-01...C2|2025-06'`, or a "
            "backfill from the asset's page) renders every clinic x month in it in one run."
        ),
        executor_def=dg.in_process_executor,
    )


reports_job = reports_job_for(report_partitions)


class AsOfConfig(dg.Config):
    """Which cutoff to rebuild, and optionally which report to render from it."""

    as_of: str  # ISO-8601 recorded_at cutoff, e.g. 2026-03-01T00:00:00+00:00
    clinic: str = ""  # with month: also render reports/<clinic>/<month>.html from the as-of file
    month: str = ""  # YYYY-MM


@dg.op(
    name="asof_rebuild",
    description=(
        "Rebuild every SQL model from the events recorded up to `as_of` into "
        "data/asof/<cutoff>/alliance.duckdb (the warehouse and serving snapshot are untouched)."
    ),
    required_resource_keys={"duckdb", "settings"},
    pool=WRITER_POOL,
    tags={"kind": "duckdb"},
)
def asof_rebuild_op(context: dg.OpExecutionContext, config: AsOfConfig) -> str:
    """Build the as-of database and, if asked, the clinic report from it."""
    cutoff = asof_lib.parse_as_of(config.as_of)
    data = context.resources.settings.paths
    out = asof_lib.as_of_dir(data.root, cutoff) / "alliance.duckdb"
    with context.resources.duckdb.get_connection() as con:
        result = asof_lib.build_as_of(con, out, cutoff)
    context.log.info(
        f"as-of {cutoff.isoformat()} rebuilt {len(result.models)} models into {out} "
        f"from {result.raw_counts.get('raw.events', 0)} events"
    )
    report_path = ""
    if config.clinic and config.month:
        report_path = str(render_asof_report(out, config.clinic, config.month, out.parent))
        context.log.info(f"as-of report written to {report_path}")
    context.add_output_metadata({
        "path": dg.MetadataValue.path(str(out)),
        "as_of": cutoff.isoformat(),
        "events": result.raw_counts.get("raw.events", 0),
        "models": dg.MetadataValue.json(result.models),
        "report": report_path,
        "built_at": datetime.now(UTC).isoformat(),
    })
    return str(out)


def render_asof_report(db_path: Path, clinic: str, month: str, out_dir: Path) -> Path:
    """Render one clinic report from an as-of database with the reports area's own renderer."""
    from alliance.report import build_report  # imported lazily (jinja, charts)

    return build_report(db_path, out_dir / "reports", clinic, month).html_path


@dg.job(
    name="asof_job",
    description=(
        "As-of rebuild: the projections (and optionally one clinic report) exactly as they were "
        "when the platform knew only events recorded up to `as_of`. `alliance run --as-of T`."
    ),
    tags=_writer_tags,
    executor_def=dg.in_process_executor,
)
def asof_job() -> None:
    asof_rebuild_op()


JOBS = [ingest_job, nightly_rebuild_job, publish_job, reports_job, asof_job]


def defs() -> dg.Definitions:
    """Jobs, plus the code location's default executor (one process, steps in order)."""
    return dg.Definitions(jobs=JOBS, executor=dg.in_process_executor)
