"""Resources shared by every asset: the DuckDB working warehouse and the platform settings."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource

from alliance.config import DataPaths, paths, warehouse_config


class WarehouseResource(DuckDBResource):
    """The working warehouse: a DuckDB connection that waits out another writer's lock.

    DuckDB lets one process write a file. The duckdb_writer pool keeps our own steps apart; this
    covers the rest (an analyst who opened the working file, a CLI run racing the daemon): a lock
    error is retried with exponential backoff and a log line naming the file and the wait, and
    only raised after `lock_timeout_seconds`.
    """

    lock_timeout_seconds: float = 120.0
    lock_first_delay_seconds: float = 0.2

    @contextmanager
    def get_connection(self) -> Iterator[duckdb.DuckDBPyConnection]:
        if self.database != ":memory:":
            Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        conn = connect_with_retry(
            self.database,
            config={"custom_user_agent": "alliance-dagster", **self.connection_config},
            timeout_seconds=self.lock_timeout_seconds,
            first_delay_seconds=self.lock_first_delay_seconds,
        )
        try:
            yield conn
        finally:
            conn.close()


def _is_lock_error(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, duckdb.IOException) and ("lock" in text or "resource temporarily" in text)


def connect_with_retry(
    database: str,
    *,
    read_only: bool = False,
    config: dict | None = None,
    timeout_seconds: float = 120.0,
    first_delay_seconds: float = 0.2,
    max_delay_seconds: float = 10.0,
) -> duckdb.DuckDBPyConnection:
    """Open a DuckDB file, retrying with backoff while another process holds its lock."""
    log = dg.get_dagster_logger("alliance.duckdb")
    deadline = time.monotonic() + timeout_seconds
    delay = first_delay_seconds
    attempt = 1
    while True:
        try:
            return duckdb.connect(database, read_only=read_only, config=config or {})
        except duckdb.IOException as e:
            if not _is_lock_error(e) or time.monotonic() + delay > deadline:
                raise
            holder = str(e).split("Conflicting lock is held in", 1)[-1].split(".", 1)[0].strip()
            log.warning(
                f"DuckDB file {database} is locked by another process ({holder or 'unknown'}); "
                f"attempt {attempt} failed, retrying in {delay:.1f} s "
                f"(gives up after {timeout_seconds:.0f} s)"
            )
            time.sleep(delay)
            delay = min(delay * 2, max_delay_seconds)
            attempt += 1


class AllianceSettings(dg.ConfigurableResource):
    """Platform settings: data directory, demo mode (local pseudonym key), as-of cutoff."""

    data_dir: str = ""  # empty: $ALLIANCE_DATA_DIR or ./data
    demo: bool = False
    snapshot_keep: int = 3  # previous serving snapshots kept in serving/history/

    @property
    def paths(self) -> DataPaths:
        return paths(self.data_dir or None)


def default_resources() -> dict[str, object]:
    p = paths()
    return {
        "duckdb": WarehouseResource(database=str(p.warehouse), connection_config=warehouse_config()),
        "settings": AllianceSettings(
            demo=os.environ.get("ALLIANCE_DEMO", "") == "1",
            snapshot_keep=int(os.environ.get("ALLIANCE_SNAPSHOT_KEEP", "3")),
        ),
    }
