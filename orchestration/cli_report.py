"""`alliance report --clinic C --month YYYY-MM`: render one clinic report through Dagster."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="render the monthly report of one clinic from the serving snapshot",
        description="Materialise reports/clinic_report for the clinic x month partition (the same "
        "Dagster asset the schedule runs) into data/reports/<clinic>/<YYYY-MM>.html.",
    )
    p.add_argument("--clinic", required=True, help="clinic id as in the data, e.g. C1")
    p.add_argument("--month", required=True, help="report month, YYYY-MM")
    p.add_argument("--min-cell", type=int, default=int(os.environ.get("ALLIANCE_MIN_CELL", "11")),
                   help="suppress figures resting on fewer patients than this (default 11)")
    p.add_argument("--pdf", action="store_true", help="also print a PDF with headless Chromium")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """Add the clinic partition if needed, then materialise the one partition in-process."""
    import dagster as dg

    from alliance.config import paths
    from alliance.report import report_path
    from alliance.report.data import parse_month
    from assets.reports import clinic_report
    from orchestration.partitions import (
        add_clinic_partitions,
        clinic_partitions,
        report_partition_key,
    )
    from orchestration.resources import AllianceSettings

    month = f"{parse_month(args.month):%Y-%m}"
    data = paths()
    if not data.serving.exists():
        print(f"{data.serving}: no published snapshot yet; run `alliance run` first")
        return 1
    instance = _instance()
    add_clinic_partitions(instance, data.serving)
    if args.clinic not in instance.get_dynamic_partitions(clinic_partitions.name):
        print(f"clinic {args.clinic!r} is not in the snapshot {data.serving}")
        return 1
    result = dg.materialize(
        [clinic_report],
        partition_key=report_partition_key(args.clinic, month),
        instance=instance,
        resources={"settings": AllianceSettings()},
        run_config={"ops": {"reports__clinic_report": {"config": {
            "min_cell": args.min_cell, "pdf": args.pdf}}}},
        selection=[clinic_report],
    )
    if not result.success:
        return 1
    print(report_path(data.reports, args.clinic, month))
    return 0


def _instance():  # noqa: ANN202
    """The project's Dagster instance (DAGSTER_HOME under the data directory), else ephemeral."""
    import dagster as dg

    try:
        from orchestration.instance import get_instance  # type: ignore[attr-defined]

        return get_instance()
    except (ImportError, AttributeError):
        pass
    if os.environ.get("DAGSTER_HOME"):
        return dg.DagsterInstance.get()
    return dg.DagsterInstance.ephemeral()
