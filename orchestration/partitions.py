"""Clinic x month partitions for the monthly clinic reports; clinics are discovered from the data.

The clinic dimension is dynamic (`clinic`): clinics are added from the published snapshot by
:func:`add_clinic_partitions` (called by the publish step and by `clinic_partitions_sensor`).
The month dimension is monthly (`month`, keys "YYYY-MM") from $ALLIANCE_REPORTS_START (default
2024-01) to the last complete month. A multi-partition key reads "<clinic>|<YYYY-MM>".
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import dagster as dg

from alliance.config import ConfigError

CLINIC_DIM = "clinic"
MONTH_DIM = "month"
MONTH_FMT = "%Y-%m"
REPORTS_START = os.environ.get("ALLIANCE_REPORTS_START", "").strip() or "2024-01"
if not re.fullmatch(r"\d{4}-(0[1-9]|1[0-2])", REPORTS_START):
    raise ConfigError(f"ALLIANCE_REPORTS_START={REPORTS_START!r} is not a month YYYY-MM")

clinic_partitions = dg.DynamicPartitionsDefinition(name="clinic")
month_partitions = dg.MonthlyPartitionsDefinition(start_date=REPORTS_START, fmt=MONTH_FMT)
report_partitions = dg.MultiPartitionsDefinition(
    {CLINIC_DIM: clinic_partitions, MONTH_DIM: month_partitions}
)


def report_partition_key(clinic: str, month: str) -> dg.MultiPartitionKey:
    """The partition key of one clinic's report for one month ('YYYY-MM')."""
    return dg.MultiPartitionKey({CLINIC_DIM: clinic, MONTH_DIM: month})


def clinics_in_serving(serving: Path) -> list[str]:
    """Clinics present in the published snapshot (opened read-only)."""
    import duckdb

    from alliance.report.data import clinics

    if not Path(serving).exists():
        return []
    with duckdb.connect(str(serving), read_only=True) as con:
        return clinics(con)


def add_clinic_partitions(instance: dg.DagsterInstance, serving: Path) -> list[str]:
    """Add every clinic found in the snapshot as a `clinic` partition; returns the new ones."""
    found = clinics_in_serving(serving)
    known = set(instance.get_dynamic_partitions(clinic_partitions.name))
    new = [c for c in found if c not in known]
    if new:
        instance.add_dynamic_partitions(clinic_partitions.name, new)
    return new
