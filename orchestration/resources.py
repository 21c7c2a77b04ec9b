"""Resources shared by every asset: the DuckDB working warehouse and the platform settings."""

from __future__ import annotations

import fcntl
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
from dagster_duckdb import DuckDBResource
from pydantic import PrivateAttr

from alliance.config import DataPaths, env_number, is_duckdb_lock_error, paths, warehouse_config

RUN_LOCK_TIMEOUT_ENV = "ALLIANCE_RUN_LOCK_TIMEOUT_SECONDS"


class WarehouseResource(DuckDBResource):
    """The working warehouse: a DuckDB connection that waits out another writer's lock.

    DuckDB lets one process write a file. The duckdb_writer pool keeps our own steps apart; this
    covers the rest (an analyst who opened the working file, a CLI run racing the daemon): a lock
    error is retried with exponential backoff and a log line naming the file and the wait, and
    only raised after `lock_timeout_seconds`.
    """

    lock_timeout_seconds: float = 120.0
    lock_first_delay_seconds: float = 0.2
    # How long a writer run waits for another writer run to finish (see setup_for_execution).
    run_lock_timeout_seconds: float = env_number(RUN_LOCK_TIMEOUT_ENV, 7200, minimum=0)
    _run_lock_fd: int | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """A writer run (tag alliance/writer) holds an exclusive file lock for its whole length.

        The run queue's tag limit keeps queued writer runs apart, but `alliance run` / `alliance
        ingest` execute in their own process and skip the queue, and the op pool only keeps
        single steps apart: without this, a CLI run's publish could copy a warehouse that another
        run had half updated (ingested, models not yet rebuilt). An OS lock next to the warehouse
        file serialises writer runs however they were launched; it is released when the run's
        resources are torn down, or by the OS when the process dies.
        """
        run = context.dagster_run
        if run is None or not is_writer_run(run) or self.database == ":memory:":
            return
        log = context.log.info if context.log else None
        warn = context.log.warning if context.log else None
        if context.instance is not None:
            # (before the wait: a run waiting for the lock is alive, and says so by its pid)
            _tag_process(context.instance, run.run_id, warn)
        self._run_lock_fd = acquire_run_lock(run_lock_path(self.database),
                                             timeout_seconds=self.run_lock_timeout_seconds, log=log)
        if context.instance is not None:
            try:
                reap_dead_writer_runs(context.instance, run.run_id, warn)
                free_dead_writer_slots(context.instance, run.run_id, warn)
            except Exception as e:  # noqa: BLE001 - a failed clean-up must not keep the lock
                # (Dagster does not tear down a resource whose setup raised: the lock stayed
                # taken for the rest of the process, and its next writer run waited 2 hours)
                if warn is not None:
                    warn(f"could not check the writer pool for runs that died: {e}")

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._run_lock_fd is not None:
            release_run_lock(self._run_lock_fd)
            self._run_lock_fd = None

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


# Asset key prefixes of the groups that only read the working warehouse or the snapshot.
READ_ONLY_KEY_PREFIXES = frozenset({"reports", "exports"})
# Dagster's implicit asset job ("__ASSET_JOB"; older releases added a partition suffix), named
# only in a private module.
IMPLICIT_ASSET_JOB_PREFIX = "__ASSET_JOB"


def is_writer_run(run: dg.DagsterRun) -> bool:
    """Whether a run writes the working warehouse, so must hold the writer-run lock.

    The named writer jobs carry the alliance/writer tag. A run of the implicit asset job (the
    UI's Materialize, `dg launch --assets`, an asset check executed on its own) carries no tag:
    it is a writer run unless every asset and check it selects belongs to a read-only group
    (reports, exports). Before, such runs skipped the lock, so a snapshot materialized from the
    UI could copy a warehouse another run was half-way through updating.
    """
    from orchestration.jobs import WRITER_TAG

    if run.tags.get(WRITER_TAG) == "true":
        return True
    if not run.job_name.startswith(IMPLICIT_ASSET_JOB_PREFIX):
        return False  # named jobs declare it with the tag (orchestration/jobs.py)
    if run.asset_selection is None and run.asset_check_selection is None:
        return True  # the whole asset graph
    keys = [*(run.asset_selection or ()), *(c.asset_key for c in run.asset_check_selection or ())]
    return any(k.path[0] not in READ_ONLY_KEY_PREFIXES for k in keys)


# The process that executes a writer run, recorded on the run when its resources start, so a
# dead run can be told from a live one (Dagster's default run launcher has no health check: a
# run whose process was killed stays STARTED, and the run queue's writer limit waits for it).
PID_TAG = "alliance/pid"
HOST_TAG = "alliance/host"
# The process's start time (clock ticks after boot) and the boot's id: a pid reused after a reboot
# or a container restart (numbering starts again) then names another process, not the run's.
PROC_START_TAG = "alliance/process_start"
BOOT_TAG = "alliance/boot_id"
# A writer run with no process recorded this long after it started died before its resources
# started (process start and definitions load take seconds).
NO_PID_GRACE_SECONDS = 600.0


def _proc_start(pid: int) -> str | None:
    """A process's start time in clock ticks after boot (/proc/<pid>/stat field 22); None where
    /proc cannot tell (another system, the process gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _tag_process(instance: dg.DagsterInstance, run_id: str, warn: Any = None) -> None:
    """Record the process executing `run_id` on the run (once: the first resource to start)."""
    try:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.tags.get(PID_TAG) == str(os.getpid()):
            return
        tags = {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
        start, boot = _proc_start(os.getpid()), _boot_id()
        if start and boot:
            tags.update({PROC_START_TAG: start, BOOT_TAG: boot})
        instance.add_run_tags(run_id, tags)
    except Exception as e:  # noqa: BLE001 - only the dead-run check needs it
        if warn is not None:
            warn(f"could not record this run's process on the run: {e}")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def process_gone(run: dg.DagsterRun) -> bool:
    """Whether the process recorded on `run` (this host only) no longer exists."""
    pid = run.tags.get(PID_TAG)
    if not pid or run.tags.get(HOST_TAG) != socket.gethostname():
        return False  # (another host's run is not judged here)
    if not _process_alive(int(pid)):
        return True
    # alive: the same process, unless the pid was reused after a reboot or a container restart
    boot = _boot_id()
    if run.tags.get(BOOT_TAG) and boot and run.tags[BOOT_TAG] != boot:
        return True
    start = _proc_start(int(pid))
    return bool(run.tags.get(PROC_START_TAG)) and start is not None \
        and start != run.tags[PROC_START_TAG]


def _lock_free(path: Path) -> bool:
    """Whether nobody holds the writer-run lock at `path` (taken and released at once)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # (closing releases a lock taken here)
    return True


def reap_dead_writer_runs(instance: dg.DagsterInstance, current_run_id: str | None = None,
                          log: Any = None, now: float | None = None,
                          lock_path: Path | None = None) -> list[str]:
    """Mark failed, and free the pool slots of, the unfinished writer runs whose process is gone.

    A run is judged dead only when that is certain: its recorded process (same host) no longer
    exists (or its pid now names another process: another boot, another start time), or no
    process was ever recorded, it started NO_PID_GRACE_SECONDS ago and no writer run holds the
    writer-run lock at `lock_path` (when given; the holder may be that very run). The daemon
    runs this every minute (writer_run_reaper sensor): a dead STARTED run held the run queue's
    writer limit, and a slot it held the pool, so no queued writer run (landing files, the
    nightly rebuild, the UI) ever started again, and no CLI run came to clean up.
    """
    from orchestration.instance import WRITER_POOL

    now = time.time() if now is None else now
    unfinished = instance.get_runs(filters=dg.RunsFilter(statuses=[
        dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING]))
    reaped = []
    for run in unfinished:
        if run.run_id == current_run_id or not is_writer_run(run):
            continue
        pid = run.tags.get(PID_TAG)
        if pid:
            if not process_gone(run):
                continue
            why = f"its process (pid {pid}) is gone"
        else:
            stats = instance.get_run_stats(run.run_id)
            started = stats.start_time or stats.launch_time
            if started is None:
                record = instance.get_run_record_by_id(run.run_id)
                started = record.create_timestamp.timestamp() if record else None
            if started is None or now - started < NO_PID_GRACE_SECONDS:
                continue
            if lock_path is not None and not _lock_free(lock_path):
                continue  # (a writer run holds the warehouse: it may be this one)
            why = f"it recorded no process in {int(now - started)} s"
        # (read again: a run that finished between the listing and the check wrote its end
        # before its process exited, and a failure must not overwrite it)
        run = instance.get_run_by_id(run.run_id)
        if run is None or run.is_finished:
            continue
        _fail_and_free(instance, run.run_id, run,
                       f"writer run {run.run_id} never finished: {why} (killed hard, e.g. kill -9 "
                       f"or the OOM killer). Marked failed and its {WRITER_POOL} slots freed.", log)
        reaped.append(run.run_id)
    return reaped


def _fail_and_free(instance: dg.DagsterInstance, run_id: str, run: dg.DagsterRun | None,
                   message: str, log: Any) -> None:
    """Mark a dead writer run failed (unless it finished) and free its writer pool slots."""
    if run is not None and not run.is_finished:
        instance.report_run_failed(run, message=message)
    try:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
    except NotImplementedError:  # storages without global concurrency
        pass
    if log is not None:
        log(message)


def free_dead_writer_slots(instance: dg.DagsterInstance, current_run_id: str,
                           log: Any = None) -> list[str]:
    """Free the writer pool's slots of writer runs whose process died; their run ids.

    Called with the writer-run lock held. Every writer run holds that lock from its resources'
    start to their teardown, and its steps claim (or wait for) the pool's slot only in between
    (in-process executor), so another writer run that holds, was assigned or waits for a slot
    now cannot be alive: its process was killed (kill -9, the OOM killer, a reboot) before it
    could free the slot. The slot stayed claimed and every later writer run waited for it for
    ever, silently (Dagster logs that wait at DEBUG); the dead run stayed STARTED. It is marked
    failed and its slots are freed.
    """
    from orchestration.instance import WRITER_POOL

    storage = instance.event_log_storage
    try:
        info = storage.get_concurrency_info(WRITER_POOL)
    except NotImplementedError:  # storages without global concurrency
        return []
    holders = info.active_run_ids | {p.run_id for p in info.pending_steps}
    freed = []
    for run_id in sorted(holders - {current_run_id}):
        run = instance.get_run_by_id(run_id)
        if run is not None and not is_writer_run(run):
            continue  # (no writer step: not ours to judge)
        _fail_and_free(instance, run_id, run,
                       f"run {run_id} held the {WRITER_POOL} pool's slot, but its process is gone "
                       "(the writer-run lock was free): it was killed before it could free the "
                       f"slot. Marked failed and its slot freed by run {current_run_id}.", log)
        freed.append(run_id)
    return freed


def run_lock_path(database: str | Path) -> Path:
    """The lock file of writer runs: next to the warehouse (inside the data directory)."""
    return Path(str(database) + ".run.lock")


def acquire_run_lock(path: Path, *, timeout_seconds: float, log: Any = None,
                     poll_seconds: float = 0.5, log_every_seconds: float = 30.0) -> int:
    """Take the exclusive writer-run lock at `path`, waiting up to `timeout_seconds`; the fd."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    started = time.monotonic()
    next_log = 0.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waited = time.monotonic() - started
            holder = _lock_holder(path)
            if waited >= timeout_seconds:
                os.close(fd)
                raise RuntimeError(
                    f"{path}: another writer run ({holder}) still holds the warehouse after "
                    f"{waited:.0f} s; this run gives up (${RUN_LOCK_TIMEOUT_ENV}="
                    f"{timeout_seconds:g})") from None
            if log is not None and waited >= next_log:
                log(f"waiting for another writer run ({holder}) to finish: {path}, "
                    f"{waited:.0f} s so far")
                next_log += log_every_seconds
            time.sleep(poll_seconds)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        return fd


def release_run_lock(fd: int) -> None:
    """Release and close a lock taken by acquire_run_lock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _lock_holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown process"
    except OSError:
        return "unknown process"


_is_lock_error = is_duckdb_lock_error  # (the connection retry below, reject-file, tests)


def lock_holder_from_error(message: str) -> str:
    """The process named in DuckDB's lock error ("Conflicting lock is held in <program> (PID n)
    by user u"), whole: a path with dots in it (python3.11, .venv) is not cut short."""
    m = re.search(r"Conflicting lock is held in (.+? \(PID \d+\))", message)
    if m:
        return m.group(1)
    rest = message.split("Conflicting lock is held in", 1)
    return rest[1].strip().split("\n", 1)[0][:200] if len(rest) == 2 else ""


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
            holder = lock_holder_from_error(str(e))
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

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # (a writer run whose steps need no warehouse, e.g. a re-execution of the exports step,
        # records its process here: the reaper must not take it for dead)
        run = context.dagster_run
        if run is not None and context.instance is not None and is_writer_run(run):
            _tag_process(context.instance, run.run_id,
                         context.log.warning if context.log else None)

    @property
    def paths(self) -> DataPaths:
        return paths(self.data_dir or None)


def default_resources() -> dict[str, object]:
    p = paths()
    return {
        "duckdb": WarehouseResource(database=str(p.warehouse), connection_config=warehouse_config()),
        "settings": AllianceSettings(
            demo=os.environ.get("ALLIANCE_DEMO", "") == "1",
            snapshot_keep=int(env_number("ALLIANCE_SNAPSHOT_KEEP", 3, minimum=0, integer=True)),
        ),
    }
