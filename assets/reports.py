"""Monthly clinic reports as a Dagster asset, partitioned by clinic x month.

Reads only the published snapshot (serving/alliance.duckdb), never the working warehouse, so
rendering reports never competes with the pipeline for the DuckDB write lock.
"""

import os

import dagster as dg

from alliance.report import Options, build_report
from orchestration.partitions import CLINIC_DIM, MONTH_DIM, report_partitions


class ReportConfig(dg.Config):
    """Per-run report settings (defaults: min_cell 11, or $ALLIANCE_MIN_CELL)."""

    min_cell: int = int(os.environ.get("ALLIANCE_MIN_CELL", "11"))
    protect_numerators: bool = True
    pdf: bool = False


@dg.asset(
    key=["reports", "clinic_report"],
    group_name="reports",
    deps=[dg.AssetKey(["serving", "snapshot"])],
    partitions_def=report_partitions,
    kinds={"html"},
    owners=["team:data-engineering"],
    required_resource_keys={"settings"},
    description=(
        "Monthly clinic report: data/reports/<clinic>/<YYYY-MM>.html, one self-contained printable "
        "file (inline CSS and SVG charts), built from the serving snapshot with small cells "
        "(fewer than min_cell patients) suppressed, including secondary suppression."
    ),
)
def clinic_report(context: dg.AssetExecutionContext, config: ReportConfig) -> dg.MaterializeResult:
    """Render one clinic's report for one month from the published snapshot."""
    keys = context.partition_key.keys_by_dimension  # type: ignore[union-attr]
    clinic, month = keys[CLINIC_DIM], keys[MONTH_DIM]
    data = context.resources.settings.paths
    res = build_report(
        data.serving, data.reports, clinic, month,
        Options(min_cell=config.min_cell, protect_numerators=config.protect_numerators),
        pdf=config.pdf,
    )
    context.log.info(f"report for clinic {clinic}, {month}: {res.html_path}")
    return dg.MaterializeResult(metadata={
        "path": dg.MetadataValue.path(str(res.html_path)),
        "pdf": dg.MetadataValue.path(str(res.pdf_path)) if res.pdf_path else None,
        "bytes": res.bytes,
        "charts": res.charts,
        "suppressed_cells": res.suppressed_cells,
        "min_cell": config.min_cell,
    })


def defs() -> dg.Definitions:
    return dg.Definitions(assets=[clinic_report])
