"""Publishing the serving snapshot: write a new file, swap it into place atomically, keep history.

Analysts and reports open `serving/alliance.duckdb` read-only. The pipeline never writes that
file in place: it checkpoints the working warehouse, rewrites its live data into a brand-new file
next to the target (a logical copy by a fresh process, so no stale bytes of raw export lines can
travel along: `_clean_copy`), verifies the copy opens, and `os.replace`s it over the old name. On
POSIX the rename is atomic, so a reader sees either the old or the new snapshot, never a
half-written one, and a reader that already holds the old file open keeps reading the old inode
until it reconnects.

No Dagster imports: the CLI, the publish asset and the tests all use these functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb

DEFAULT_KEEP = 3
# Tables an analyst must find in a snapshot; a copy without them is never published.
REQUIRED_SCHEMAS = ("raw",)
_STAMP_RE = re.compile(r"^alliance-(\d{8}T\d{6}\d{6}Z)\.duckdb$")


class SnapshotError(RuntimeError):
    """A snapshot could not be written or verified; the previous snapshot is left untouched."""


@dataclass(frozen=True)
class SnapshotInfo:
    """What one publish produced."""

    path: Path  # the serving file (the stable name analysts open)
    history_path: Path | None  # the same snapshot under serving/history/
    published_at: datetime
    bytes: int
    tables: int
    row_counts: dict[str, int]
    pruned: tuple[Path, ...] = ()
    data_version: str | None = None
    # The previous history entry, dropped because it held the same data version (a run that
    # changed no data: only its check results are newer).
    superseded: Path | None = None


def _stamp(ts: datetime) -> str:
    return ts.strftime("%Y%m%dT%H%M%S%fZ")


def history_dir(serving_path: Path) -> Path:
    """Where previous snapshots are kept: serving/history/ next to the serving file."""
    return serving_path.parent / "history"


def list_history(serving_path: Path) -> list[Path]:
    """Snapshots kept in history, oldest first (by the timestamp in the name)."""
    d = history_dir(serving_path)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if _STAMP_RE.match(p.name))


def _version_file(snapshot: Path) -> Path:
    return snapshot.with_name(snapshot.name + ".version")


def data_version(con: duckdb.DuckDBPyConnection) -> str:
    """What the snapshot's data depends on, hashed: the event log's and manifest's extent, the
    rejected files, and every model's code and seed inputs as last built (meta.model_state).

    Two publishes with the same version hold the same events and models; only the check
    history (quality.*) and build times differ. It is cheap (counts and maxima, no table scan
    of the marts).
    """
    cols: dict[tuple[str, str], set[str]] = {}
    for schema, name, col in con.execute(
            "select schema_name, table_name, column_name from duckdb_columns() "
            "where database_name = current_database() and schema_name in ('raw', 'meta')"
    ).fetchall():
        cols.setdefault((schema, name), set()).add(col)
    parts: dict[str, object] = {}
    # The log and its manifest only grow: their size and latest row tell their state.
    for name, latest in (("events", "recorded_at"), ("quarantine", "recorded_at"),
                         ("ingested_files", "file_id")):
        have = cols.get(("raw", name))
        if have is not None:
            last = f"max({latest})::varchar" if latest in have else "null"
            parts[name] = list(con.execute(f"select count(*), {last} from raw.{name}").fetchone())
    if "file_id" in cols.get(("raw", "rejected_files"), ()):
        parts["rejected_files"] = con.execute(
            "select string_agg(file_id::varchar, ',' order by file_id) from raw.rejected_files"
        ).fetchone()[0]
    state = cols.get(("meta", "model_state"), set())
    if {"model", "code_hash", "inputs_hash", "built_through_file_id"} <= state:
        parts["models"] = [list(r) for r in con.execute(
            "select model, code_hash, inputs_hash, built_through_file_id from meta.model_state "
            "order by model").fetchall()]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def prune_history(serving_path: Path, keep: int = DEFAULT_KEEP) -> list[Path]:
    """Delete all but the newest `keep` history snapshots; returns the deleted paths.

    The current serving file is never deleted (it is a separate name; deleting a history link to
    the same inode leaves it intact).
    """
    if keep < 0:
        raise ValueError(f"snapshot retention must be >= 0, got {keep}")
    old = list_history(serving_path)
    doomed = old[: max(0, len(old) - keep)]
    for p in doomed:
        p.unlink(missing_ok=True)
        _version_file(p).unlink(missing_ok=True)
    return doomed


def table_row_counts(con: duckdb.DuckDBPyConnection,
                     schemas: Sequence[str] | None = None) -> dict[str, int]:
    """Row counts of every base table (`schema.table`) in the connection's current database."""
    rows = con.execute(
        "select schema_name, table_name from duckdb_tables() "
        "where database_name = current_database() and not internal order by 1, 2"
    ).fetchall()
    counts: dict[str, int] = {}
    for schema, table in rows:
        if schemas is not None and schema not in schemas:
            continue
        n = con.execute(f'select count(*) from "{schema}"."{table}"').fetchone()[0]
        counts[f"{schema}.{table}"] = int(n)
    return counts


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not every platform allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _verify(path: Path, required_schemas: Sequence[str]) -> tuple[int, dict[str, int]]:
    """Open a finished copy read-only and count its tables; raises SnapshotError if unusable."""
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as e:
        raise SnapshotError(f"{path}: the new snapshot does not open: {e}") from e
    try:
        counts = table_row_counts(con)
        present = {k.split(".", 1)[0] for k in counts}
        missing = [s for s in required_schemas if s not in present]
        if missing:
            raise SnapshotError(f"{path}: the new snapshot lacks schemas {missing}; not published")
        n_objects = con.execute(
            "select count(*) from duckdb_tables() where database_name = current_database()"
        ).fetchone()[0]
        return int(n_objects), counts
    finally:
        con.close()


# Run by a fresh interpreter: its memory never held a raw export line (see _clean_copy).
_CLEAN_COPY_CODE = """
import sys, duckdb
src, dst, memory_limit = sys.argv[1], sys.argv[2], sys.argv[3]
con = duckdb.connect(dst, config={"memory_limit": memory_limit})
con.execute("attach '" + src.replace("'", "''") + "' as snapshot_source (read_only)")
target = con.execute("select current_database()").fetchone()[0]
con.execute('copy from database snapshot_source to "' + target.replace('"', '""') + '"')
con.execute("detach snapshot_source")
con.execute("checkpoint")
con.close()
"""


def _clean_copy(src: Path, dst: Path) -> None:
    """Write the live contents of the DuckDB file `src` into a new file `dst`, in a new process.

    Why not the bytes: DuckDB writes the unused tail of some storage blocks without clearing it
    (duckdb/duckdb#23382, open in 1.5), so a file can carry fragments of whatever the writing
    process had in memory before, and the ingest process had raw export lines, identifiers
    included (found in the byte stream of a published snapshot). A logical copy (COPY FROM
    DATABASE: tables, views, comments) made by a process that never read a raw line can only
    leak pseudonymised warehouse data. It costs a few seconds per GB.

    The copy has the warehouse's memory limit (`config.warehouse_config`): with DuckDB's own
    default, 80% of RAM, the copy of a 10^7-event warehouse reached 8.7 GB (the limit for the
    whole run is 8 GB; docs/benchmark.md).
    """
    from alliance.config import warehouse_config

    done = subprocess.run([sys.executable, "-c", _CLEAN_COPY_CODE, str(src), str(dst),
                           warehouse_config()["memory_limit"]], capture_output=True, text=True)
    if done.returncode != 0:
        dst.unlink(missing_ok=True)
        raise SnapshotError(f"{dst}: the snapshot copy failed: {done.stderr.strip()[-2000:]}")


def publish_from_connection(
    con: duckdb.DuckDBPyConnection,
    warehouse_path: Path | str,
    serving_path: Path | str,
    *,
    keep: int = DEFAULT_KEEP,
    required_schemas: Sequence[str] = REQUIRED_SCHEMAS,
    now: datetime | None = None,
) -> SnapshotInfo:
    """Publish the warehouse that `con` has open (read-write) as the new serving snapshot.

    The caller holds the only writer connection (the duckdb_writer pool guarantees no other
    pipeline step writes meanwhile), so after CHECKPOINT the file on disk is complete and
    quiescent and can be copied. Steps: checkpoint, copy the bytes to
    `<warehouse folder>/.snapshot-source/<stamp>.duckdb.source`, rewrite its live data into
    `serving/.incoming/<stamp>.duckdb.partial` in a fresh process (`_clean_copy`), fsync, verify it
    opens read-only, hard-link it into `serving/history/`, `os.replace` it over
    `serving/alliance.duckdb`, prune history to `keep`.
    """
    warehouse_path = Path(warehouse_path)
    serving_path = Path(serving_path)
    ts = now or datetime.now(UTC)
    incoming = serving_path.parent / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    hist = history_dir(serving_path)
    hist.mkdir(parents=True, exist_ok=True)
    partial = incoming / f"alliance-{_stamp(ts)}.duckdb.partial"

    # CHECKPOINT folds the WAL into the main file; without it the copy would miss recent writes.
    con.execute("checkpoint")
    version = data_version(con)
    wal = Path(str(warehouse_path) + ".wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise SnapshotError(
            f"{wal}: the write-ahead log is not empty after CHECKPOINT (another connection has an "
            "open transaction); nothing was published, retry when the writer is done"
        )
    # The byte copy holds the working warehouse's bytes (raw-identifier fragments may sit in
    # unused parts of its blocks): it stays beside the warehouse, never under serving/.
    sources = source_dir(warehouse_path)
    sources.mkdir(parents=True, exist_ok=True)
    raw_copy = sources / f"alliance-{_stamp(ts)}.duckdb.source"
    try:
        # 1. a byte copy of the quiescent file (fast; this process keeps its connection), then
        # 2. a logical copy of its live data into the new file by a fresh process (_clean_copy).
        with open(warehouse_path, "rb") as src, open(raw_copy, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)
        _clean_copy(raw_copy, partial)
        raw_copy.unlink()
        with open(partial, "rb+") as dst:
            os.fsync(dst.fileno())
        tables, counts = _verify(partial, required_schemas)
        size = partial.stat().st_size
        # Read-only on disk too: a snapshot is never edited, only replaced.
        os.chmod(partial, 0o444)
        history_path: Path | None = hist / f"alliance-{_stamp(ts)}.duckdb"
        try:
            os.link(partial, history_path)
        except OSError:
            # Filesystems without hard links: keep a copy instead.
            shutil.copy2(partial, history_path)
        _version_file(history_path).write_text(version + "\n")
        os.replace(partial, serving_path)
        _fsync_dir(serving_path.parent)
    except BaseException:
        partial.unlink(missing_ok=True)
        raw_copy.unlink(missing_ok=True)
        raise
    # History keeps data versions, not runs: a publish that changed no data (a nightly run with
    # no new file) replaces the newest entry instead of pushing the last real change out.
    superseded = None
    earlier = [h for h in list_history(serving_path) if h != history_path]
    if earlier and _read_version(earlier[-1]) == version:
        superseded = earlier[-1]
        superseded.unlink(missing_ok=True)
        _version_file(superseded).unlink(missing_ok=True)
    pruned = tuple(prune_history(serving_path, keep))
    return SnapshotInfo(path=serving_path, history_path=history_path, published_at=ts,
                        bytes=size, tables=tables, row_counts=counts, pruned=pruned,
                        data_version=version, superseded=superseded)


def _read_version(snapshot: Path) -> str | None:
    try:
        return _version_file(snapshot).read_text().strip() or None
    except OSError:
        return None  # a snapshot from before data versions: never superseded


def snapshot_age_seconds(serving_path: Path | str, now: float | None = None) -> float | None:
    """Seconds since the serving snapshot was published (its mtime), or None if there is none."""
    p = Path(serving_path)
    if not p.exists():
        return None
    return (now if now is not None else time.time()) - p.stat().st_mtime


def source_dir(warehouse_path: Path | str) -> Path:
    """Where a publish keeps its byte copy of the warehouse while it is rewritten."""
    return Path(warehouse_path).parent / ".snapshot-source"


def clean_incoming(serving_path: Path | str, warehouse_path: Path | str | None = None,
                   older_than_seconds: float = 0) -> list[Path]:
    """Remove leftovers of publishes that crashed mid-copy: partial snapshots in
    serving/.incoming (never visible to readers) and byte copies of the warehouse, beside it or
    under serving/.incoming where earlier versions kept them.

    The publish step calls it holding the writer-run lock, so no other publish is writing them
    (hence no age limit by default). A byte copy left there by a killed publish stayed for good
    (only *.partial was removed), a copy of the working warehouse's bytes inside serving/.
    """
    cutoff = time.time() - older_than_seconds
    # (*.wal: the write-ahead log of a copy cut short; *.partial.tmp: the folder where the copy
    # spills above its memory limit, which DuckDB removes when it closes normally)
    folders = [(Path(serving_path).parent / ".incoming",
                ("*.partial", "*.partial.wal", "*.partial.tmp", "*.source", "*.source.wal"))]
    if warehouse_path is not None:
        folders.append((source_dir(warehouse_path), ("*.source", "*.source.wal")))
    removed = []
    for folder, patterns in folders:
        if not folder.is_dir():
            continue
        for pattern in patterns:
            for p in folder.glob(pattern):
                try:
                    if p.stat().st_mtime < cutoff or older_than_seconds <= 0:
                        if p.is_dir():
                            shutil.rmtree(p)
                        else:
                            p.unlink(missing_ok=True)
                        removed.append(p)
                except FileNotFoundError:
                    continue
    return removed
