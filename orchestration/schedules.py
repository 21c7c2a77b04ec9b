"""Schedules: a nightly full rebuild and the monthly clinic reports on the 1st.

Both start RUNNING (turn all automation off with ALLIANCE_AUTOMATION=off, or stop one in the UI).
Times are in $ALLIANCE_TIMEZONE (default UTC); the cron strings can be moved with
$ALLIANCE_NIGHTLY_CRON and $ALLIANCE_REPORTS_CRON. See docs/operations.md.
"""

import datetime as dt
import os

import dagster as dg
from dagster._utils.schedules import is_valid_cron_string  # (the check Dagster itself applies)

from alliance.config import ConfigError, is_timezone
from orchestration.jobs import nightly_rebuild_job, reports_job
from orchestration.partitions import (
    MONTH_FMT,
    REPORTS_START,
    clinic_partitions,
    month_partitions,
    report_partition_key,
)
from orchestration.sensors import automation_enabled

NIGHTLY_CRON = os.environ.get("ALLIANCE_NIGHTLY_CRON", "").strip() or "0 2 * * *"
REPORTS_CRON = os.environ.get("ALLIANCE_REPORTS_CRON", "").strip() or "0 5 1 * *"
TIMEZONE = os.environ.get("ALLIANCE_TIMEZONE", "").strip() or "UTC"
for _name, _cron in (("ALLIANCE_NIGHTLY_CRON", NIGHTLY_CRON), ("ALLIANCE_REPORTS_CRON", REPORTS_CRON)):
    if not is_valid_cron_string(_cron):
        raise ConfigError(f"{_name}={_cron!r} is not a cron schedule (five fields, e.g. '0 2 * * *')")
if not is_timezone(TIMEZONE):
    raise ConfigError(f"ALLIANCE_TIMEZONE={TIMEZONE!r} is not an IANA time zone "
                      "(e.g. Europe/Amsterdam)")


def _status() -> dg.DefaultScheduleStatus:
    return (dg.DefaultScheduleStatus.RUNNING if automation_enabled()
            else dg.DefaultScheduleStatus.STOPPED)


nightly_rebuild_schedule = dg.ScheduleDefinition(
    name="nightly_rebuild_schedule",
    job=nightly_rebuild_job,
    cron_schedule=NIGHTLY_CRON,
    execution_timezone=TIMEZONE,
    default_status=_status(),
    description=(
        "Nightly full rebuild (02:00 by default): ingest leftovers, rebuild every projection from "
        "the event log, run all checks, publish the snapshot."
    ),
)


def previous_month(today: dt.date) -> dt.date:
    """The first day of the month before `today`'s month."""
    first = today.replace(day=1)
    return (first - dt.timedelta(days=1)).replace(day=1)


def report_month(when: dt.datetime) -> str | None:
    """The month ('YYYY-MM') a tick at `when` reports on, or None if it is no month partition.

    That is the month before `when`'s month, as long as the month dimension (UTC months from
    $ALLIANCE_REPORTS_START) already holds it: with $ALLIANCE_TIMEZONE east of UTC the 1st begins
    before the UTC month has ended, and a month before the start date has no partition either. A
    run request for a missing partition would fail the whole tick, so such a tick skips instead.
    """
    month = previous_month(when.date()).strftime(MONTH_FMT)
    return month if month in month_partitions.get_partition_keys(current_time=when) else None


def monthly_report_requests(clinics: list[str], when: dt.datetime) -> list[dg.RunRequest]:
    """One report run per clinic for the month before `when` (run_key makes re-ticks no-ops)."""
    month = report_month(when)
    if month is None:
        return []
    return [
        dg.RunRequest(run_key=f"report:{clinic}:{month}",
                      partition_key=report_partition_key(clinic, month),
                      tags={"alliance/clinic": clinic, "alliance/month": month})
        for clinic in sorted(clinics)
    ]


@dg.schedule(
    name="monthly_reports_schedule",
    job=reports_job,
    cron_schedule=REPORTS_CRON,
    execution_timezone=TIMEZONE,
    default_status=_status(),
    description=(
        "On the 1st (05:00 by default) render last month's report for every clinic partition; "
        "clinics are added from the data by the publish step and clinic_partitions_sensor."
    ),
)
def monthly_reports_schedule(context: dg.ScheduleEvaluationContext):  # noqa: ANN202
    """Last month's report for every clinic partition known to the instance."""
    clinics = list(context.instance.get_dynamic_partitions(clinic_partitions.name))
    if not clinics:
        return dg.SkipReason("no clinics known yet (nothing published)")
    when = context.scheduled_execution_time or dt.datetime.now(dt.UTC)
    if report_month(when) is None:
        last = f"{previous_month(when.date()):%Y-%m}"
        if last < REPORTS_START:
            return dg.SkipReason(
                f"{last} is before $ALLIANCE_REPORTS_START={REPORTS_START}: no month is reported "
                "until that one is complete")
        return dg.SkipReason(
            f"{last} is not a complete month partition at "
            f"{when.isoformat()} (months are UTC, from {REPORTS_START}); move the schedule later "
            "in the day ($ALLIANCE_REPORTS_CRON) or launch it as a backfill"
        )
    return monthly_report_requests(clinics, when)


SCHEDULES = [nightly_rebuild_schedule, monthly_reports_schedule]


def defs() -> dg.Definitions:
    return dg.Definitions(schedules=SCHEDULES)
