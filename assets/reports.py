"""Monthly clinic reports as a Dagster asset, partitioned by clinic x month.

Reads only the published snapshot (serving/alliance.duckdb), never the working warehouse, so
rendering reports never competes with the pipeline for the DuckDB write lock.
"""

import warnings

import dagster as dg

from alliance.report import Options, build_report
from alliance.report.context import min_cell_from_env
from orchestration.partitions import CLINIC_DIM, MONTH_DIM, report_partitions


class ReportConfig(dg.Config):
    """Per-run report settings (defaults: min_cell 11, or $ALLIANCE_MIN_CELL)."""

    # validated when the definitions load: a bad $ALLIANCE_MIN_CELL stops start-up, named
    min_cell: int = min_cell_from_env()
    protect_numerators: bool = True
    pdf: bool = False


def _keys_by_dimension(key: str | dg.MultiPartitionKey) -> dict[str, str]:
    """{'clinic': ..., 'month': ...} of one partition key (a MultiPartitionKey or "C|YYYY-MM")."""
    if isinstance(key, dg.MultiPartitionKey):
        return dict(key.keys_by_dimension)
    return dict(report_partitions.get_partition_key_from_str(key).keys_by_dimension)


# `backfill_policy` is marked beta in Dagster 1.13; it is what lets a range run as one run (the
# CLI refuses ranges without it), so silence the warning for this parameter only.
warnings.filterwarnings("ignore", message=".*backfill_policy.*", category=dg.BetaWarning)


@dg.asset(
    key=["reports", "clinic_report"],
    group_name="reports",
    deps=[dg.AssetKey(["serving", "snapshot"])],
    partitions_def=report_partitions,
    # A range of partitions (UI backfill from the asset page, `dg launch --partition-range`) runs
    # as one run that renders every key in it: reports only read the snapshot, so one process
    # renders them one after another far cheaper than one run (and one process) per report.
    backfill_policy=dg.BackfillPolicy.single_run(),
    kinds={"html"},
    owners=["team:data-engineering"],
    required_resource_keys={"settings"},
    description=(
        "Monthly clinic report: data/reports/<clinic>/<YYYY-MM>.html, one self-contained printable "
        "file (inline CSS and SVG charts), built from the serving snapshot with small cells "
        "(fewer than min_cell patients) suppressed, including secondary suppression. A partition "
        "range (backfill) renders every clinic x month in it in one run."
    ),
)
def clinic_report(context: dg.AssetExecutionContext, config: ReportConfig) -> dg.MaterializeResult:
    """Render the report of every clinic x month partition in this run from the snapshot."""
    data = context.resources.settings.paths
    options = Options(min_cell=config.min_cell, protect_numerators=config.protect_numerators)
    # One key for a normal run; the whole (clinic range x month range) rectangle for a range run.
    keys = list(context.partition_keys)
    rendered = []
    for key in keys:
        dims = _keys_by_dimension(key)
        clinic, month = dims[CLINIC_DIM], dims[MONTH_DIM]
        res = build_report(data.serving, data.reports, clinic, month, options, pdf=config.pdf)
        context.log.info(f"report for clinic {clinic}, {month}: {res.html_path}")
        rendered.append((str(key), res))
    # A range run records one materialization per partition, all with this metadata: the totals,
    # and per partition its file, so each partition's page still says where its report is.
    metadata: dict[str, object] = {
        "partitions_rendered": len(rendered),
        "bytes": sum(r.bytes for _, r in rendered),
        "charts": sum(r.charts for _, r in rendered),
        "suppressed_cells": sum(r.suppressed_cells for _, r in rendered),
        "min_cell": config.min_cell,
    }
    if len(rendered) == 1:
        res = rendered[0][1]
        metadata["path"] = dg.MetadataValue.path(str(res.html_path))
        metadata["pdf"] = dg.MetadataValue.path(str(res.pdf_path)) if res.pdf_path else None
    else:
        metadata["path"] = dg.MetadataValue.path(str(data.reports))
        metadata["reports"] = dg.MetadataValue.json({
            k: {"path": str(r.html_path), "charts": r.charts,
                "suppressed_cells": r.suppressed_cells}
            for k, r in rendered
        })
    return dg.MaterializeResult(metadata=metadata)


def defs() -> dg.Definitions:
    return dg.Definitions(assets=[clinic_report])
