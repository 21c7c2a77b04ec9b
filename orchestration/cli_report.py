"""`alliance report --clinic C --month YYYY-MM`: render one clinic report through Dagster."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="render the monthly report of one clinic from the serving snapshot",
        description="Materialise reports/clinic_report for the clinic x month partition (the same "
        "Dagster asset the schedule runs) into data/reports/<clinic>/<YYYY-MM>.html.",
    )
    p.add_argument("--clinic", required=True, help="clinic id as in the data, e.g. C1")
    p.add_argument("--month", required=True, help="report month, YYYY-MM")
    p.add_argument("--min-cell", type=_min_cell_arg, default=None,
                   help="suppress figures resting on fewer patients than this (at least 2; "
                   "default $ALLIANCE_MIN_CELL or 11)")
    p.add_argument("--pdf", action="store_true", help="also print a PDF with headless Chromium")
    p.set_defaults(func=cmd_report)


def _min_cell_arg(value: str) -> int:
    from alliance.report.context import validate_min_cell

    try:
        return validate_min_cell(value, "--min-cell")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def cmd_report(args: argparse.Namespace) -> int:
    """Add the clinic partition if needed, then materialise the one partition in-process."""
    from alliance.config import paths
    from alliance.report import report_path
    from alliance.report.context import min_cell_from_env
    from alliance.report.data import parse_month
    from orchestration.execution import render_reports
    from orchestration.instance import get_instance
    from orchestration.partitions import (
        REPORTS_START,
        add_clinic_partitions,
        clinic_partitions,
        month_partitions,
    )

    if args.min_cell is None:
        try:
            args.min_cell = min_cell_from_env()
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        month = f"{parse_month(args.month):%Y-%m}"
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = paths()
    if not data.serving.exists():
        print(f"error: {data.serving}: no published snapshot yet; run `alliance run` first",
              file=sys.stderr)
        return 1
    months = month_partitions.get_partition_keys()
    if month not in months:
        if not months:  # (it said the months ran from that month to itself)
            print(f"error: no report partition for {month}: no month is reported yet, because "
                  f"$ALLIANCE_REPORTS_START={REPORTS_START} is after the last complete month",
                  file=sys.stderr)
        else:
            print(f"error: no report partition for {month}: months run from {REPORTS_START} "
                  f"($ALLIANCE_REPORTS_START) to {months[-1]}, the last complete month",
                  file=sys.stderr)
        return 2
    instance = get_instance()
    add_clinic_partitions(instance, data.serving)
    if args.clinic not in instance.get_dynamic_partitions(clinic_partitions.name):
        print(f"error: clinic {args.clinic!r} is not in the snapshot {data.serving}",
              file=sys.stderr)
        return 1
    if args.pdf:  # (an older PDF must not pass for this one when none is printed)
        report_path(data.reports, args.clinic, month).with_suffix(".pdf").unlink(missing_ok=True)
    [res] = render_reports([(args.clinic, month)], min_cell=args.min_cell, pdf=args.pdf)
    if not res["success"]:
        return 1
    html = report_path(data.reports, args.clinic, month)
    print(html)
    if args.pdf:
        pdf = html.with_suffix(".pdf")
        if not pdf.exists():
            print("alliance report --pdf: no PDF was printed: Chromium was not found (install the "
                  "Debian package chromium, or set ALLIANCE_CHROMIUM to its path)", file=sys.stderr)
            return 1
        print(pdf)
    return 0
