"""Rejecting an ingested file: the remedy when a blocking check fails on data already logged.

`raw.events` is append-only, so a file whose events fail a blocking batch check (a leaked raw
identifier, a wrong clinic, a corrupt export) cannot be edited away. The batch suite keeps that
file failing on every run until a data engineer decides; `reject_files` records the decision in
`raw.rejected_files` (append-only too, with a reason code from a fixed list: no free text in the
warehouse). From then on:

- `staging.stg_events` leaves the file's events out (as of the rejection time, so an as-of rebuild
  before it still shows what was known then), and every model built from the log rebuilds in full
  on its next run (the rejections are part of each model's inputs hash, `sqlrunner.inputs_hash`);
- the batch suite no longer re-checks the file (`quality.batch.pending_file_ids`);
- the ingest does not count the file's events as logged, so a corrected export that reuses their
  event ids is accepted instead of being quarantined as conflicting duplicates.

Nothing is deleted: the manifest, the events and the validation history stay for the audit.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePath

import duckdb

REJECTIONS_TABLE = "raw.rejected_files"
REASON_CODES = {
    "identifier_leak": "the file carries raw identifiers or free text where pseudonyms belong",
    "corrupt_export": "the producer's export was broken (truncated, mixed up, wrong encoding)",
    "wrong_clinic": "the file belongs to another clinic or service",
    "test_data": "test or training data sent to the production landing folder",
    "superseded": "the producer re-sent the period as a corrected file",
    "other": "another reason, documented outside the warehouse",
}
REJECTIONS_DDL = f"""
create schema if not exists raw;
create table if not exists {REJECTIONS_TABLE} (
    file_id bigint not null,
    reason_code varchar not null,
    rejected_at timestamptz not null
);
comment on table {REJECTIONS_TABLE} is 'Ingested files a data engineer rejected after a blocking
check failed (alliance reject-file): their events leave staging and every model; nothing is
deleted. Append-only.';
comment on column {REJECTIONS_TABLE}.file_id is 'The rejected file (raw.ingested_files.file_id).';
comment on column {REJECTIONS_TABLE}.reason_code is 'Why, from a fixed list (alliance reject-file --help): no free text.';
comment on column {REJECTIONS_TABLE}.rejected_at is 'When the rejection was recorded; as-of builds before it still see the file.';
"""


class RejectionError(ValueError):
    """A rejection that cannot be recorded (unknown file, unknown reason code)."""


@dataclass(frozen=True)
class Rejection:
    """One recorded rejection."""

    file_id: int
    file_name: str
    reason_code: str
    rejected_at: datetime
    events: int


def _table_exists(con: duckdb.DuckDBPyConnection) -> bool:
    return bool(con.execute(
        "select count(*) from duckdb_tables() where schema_name = 'raw' "
        "and table_name = 'rejected_files' and database_name = current_database()").fetchone()[0])


def ensure_rejections_table(con: duckdb.DuckDBPyConnection) -> None:
    """Create raw.rejected_files if missing (staging reads it, so every warehouse has it).

    Called before every model build: the DDL and its comments are written only when needed.
    """
    from alliance.catalog import ensure_table

    ensure_table(con, "raw", "rejected_files", REJECTIONS_DDL)


def rejected_file_ids(con: duckdb.DuckDBPyConnection) -> set[int]:
    """file_ids rejected so far (empty when the table does not exist yet)."""
    if not _table_exists(con):
        return set()
    return {int(r[0]) for r in con.execute(f"select file_id from {REJECTIONS_TABLE}").fetchall()}


def reject_files(
    con: duckdb.DuckDBPyConnection,
    files: Iterable[int | str],
    reason_code: str,
    *,
    now: datetime | None = None,
) -> list[Rejection]:
    """Reject ingested files by file_id or file name, in one transaction; returns what was done.

    A file already rejected is left as it is (not in the result). Raises RejectionError for an
    unknown reason code or a file the manifest does not know; nothing is recorded then.
    """
    if reason_code not in REASON_CODES:
        raise RejectionError(f"unknown reason code {reason_code!r}; one of: "
                             + ", ".join(sorted(REASON_CODES)))
    ensure_rejections_table(con)
    wanted = list(files)
    rows = [(int(fid), PurePath(path).name) for fid, path in con.execute(
        "select file_id, path from raw.ingested_files where status = 'ingested'").fetchall()]
    by_id = dict(rows)
    by_name: dict[str, list[int]] = {}
    for fid, name in rows:
        by_name.setdefault(name, []).append(fid)
    ids: list[int] = []
    for f in wanted:
        s = str(f)
        if s.isdigit() and int(s) in by_id:
            ids.append(int(s))
        elif s in by_name and len(by_name[s]) == 1:
            ids.extend(by_name[s])
        elif s in by_name:
            # (files of two folders, or a corrected re-send, can share a name: rejecting them all
            # would reject files nobody looked at)
            raise RejectionError(
                f"{s}: {len(by_name[s])} ingested files have this name (file_ids "
                f"{', '.join(map(str, sorted(by_name[s])))}); give the file_id of the one to reject")
        else:
            raise RejectionError(f"{s}: no ingested file with this file_id or file name "
                                 "(see raw.ingested_files)")
    done = rejected_file_ids(con)
    todo = sorted(set(ids) - done)
    at = now or datetime.now(UTC)
    counts = dict(con.execute(
        "select file_id, count(*) from raw.events where file_id in (select unnest(?::bigint[])) "
        "group by file_id", [todo]).fetchall()) if todo else {}
    con.execute("begin transaction")
    try:
        for fid in todo:
            con.execute(f"insert into {REJECTIONS_TABLE} values (?, ?, ?)", [fid, reason_code, at])
        con.execute("commit")
    except BaseException:
        con.execute("rollback")
        raise
    return [Rejection(fid, by_id[fid], reason_code, at, int(counts.get(fid, 0))) for fid in todo]
