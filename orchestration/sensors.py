"""Sensors: new landing files start ingest runs; clinics found in the data become report partitions.

Both are on by default (DefaultSensorStatus.RUNNING) and run whenever the Dagster daemon runs
(`dg dev` starts one). Turn all automation off with ALLIANCE_AUTOMATION=off, or stop a single
sensor in the UI (Automation page); see docs/operations.md.
"""

import json
import os
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
import duckdb

from alliance.config import env_number, paths
from alliance.ingest import file_sha256, landing_files
from orchestration.jobs import LANDING_FILE_TAG, LANDING_SHA_TAG, ingest_job, ingest_run_config
from orchestration.partitions import clinic_partitions, clinics_in_serving

AUTOMATION_ENV = "ALLIANCE_AUTOMATION"
SETTLE_ENV = "ALLIANCE_LANDING_SETTLE_SECONDS"
DEFAULT_SETTLE_SECONDS = 10.0
LANDING_INTERVAL_SECONDS = 30


def automation_enabled() -> bool:
    """Whether sensors and schedules start switched on ($ALLIANCE_AUTOMATION, default on)."""
    return os.environ.get(AUTOMATION_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def default_status() -> dg.DefaultSensorStatus:
    return (dg.DefaultSensorStatus.RUNNING if automation_enabled()
            else dg.DefaultSensorStatus.STOPPED)


# ------------------------------------------------------------------ landing scan (pure)


@dataclass
class LandingState:
    """The landing sensor's cursor: what it has handed off, and what it saw still changing.

    done:    relative path -> [size, mtime_ns, sha256] of the content last handed to a run
    pending: relative path -> [size, mtime_ns] seen at the previous tick, not yet stable
    """

    done: dict[str, list] = field(default_factory=dict)
    pending: dict[str, list] = field(default_factory=dict)

    @classmethod
    def from_cursor(cls, cursor: str | None) -> "LandingState":
        if not cursor:
            return cls()
        data = json.loads(cursor)
        return cls(done=data.get("done", {}), pending=data.get("pending", {}))

    def to_cursor(self) -> str:
        return json.dumps({"done": self.done, "pending": self.pending}, sort_keys=True)


@dataclass(frozen=True)
class ReadyFile:
    """A landing file that is complete and new (or changed) since the last hand-off."""

    relpath: str
    path: Path
    sha256: str
    size: int


def scan_landing(
    landing: Path,
    state: LandingState,
    *,
    now: float | None = None,
    settle_seconds: float = DEFAULT_SETTLE_SECONDS,
    ingested: Callable[[], Collection[str]] = frozenset,
) -> tuple[list[ReadyFile], LandingState, list[str]]:
    """Find files ready to ingest; returns (ready files, new state, files still being written).

    A file is ready when it has no temporary suffix (see alliance.ingest.landing_files), and its
    size and mtime are unchanged since the previous tick or it was last modified at least
    `settle_seconds` ago. A ready file whose content was already handed off (same sha256, under
    this or another name) starts nothing, and so does content `ingested()` lists (sha256 already
    in the warehouse's manifest, e.g. files `alliance demo` or `alliance run` ingested directly);
    it is called only when some file needs hashing, so a quiet tick reads no database.
    """
    now = time.time() if now is None else now
    done = dict(state.done)
    pending: dict[str, list] = {}
    ready: list[ReadyFile] = []
    waiting: list[str] = []
    handed_off = {rec[2] for rec in done.values()}
    known: Collection[str] | None = None  # ingested(), read at the first file that needs it
    present: set[str] = set()
    for path in landing_files(landing):
        rel = path.relative_to(landing).as_posix()
        present.add(rel)
        try:
            st = path.stat()
        except FileNotFoundError:  # moved away between listing and stat
            continue
        sig = [st.st_size, st.st_mtime_ns]
        prev = done.get(rel)
        if prev is not None and prev[:2] == sig:
            continue  # unchanged since handed off: no need to hash again
        settled = now - st.st_mtime >= settle_seconds
        if not settled and state.pending.get(rel) != sig:
            pending[rel] = sig  # still being written (or just arrived): look again next tick
            waiting.append(rel)
            continue
        sha = file_sha256(path)
        done[rel] = [*sig, sha]
        if known is None:
            known = ingested()
        if sha in handed_off or sha in known:
            continue  # content already handed off (re-drop, touch, copy) or already ingested
        handed_off.add(sha)
        ready.append(ReadyFile(rel, path, sha, st.st_size))
    # Forget files that left landing/ so the cursor does not grow without bound; Dagster's own
    # run_key check still stops the same content from being ingested twice.
    done = {k: v for k, v in done.items() if k in present}
    return ready, LandingState(done=done, pending=pending), waiting


def ingested_shas(serving: Path) -> set[str]:
    """sha256 of every file the published snapshot's manifest lists (empty if unreadable).

    Read from the snapshot, which no writer ever locks (the working warehouse may be held by a
    run). Without it, the first tick after `alliance demo` (which ingests directly, not through
    the sensor) would start one ingest run per demo file, hundreds of no-op runs. A file ingested
    but not yet published still gets a run, whose ingest is then a no-op.
    """
    if not serving.exists():
        return set()
    try:
        with duckdb.connect(str(serving), read_only=True) as con:
            return {r[0] for r in con.execute(
                "select sha256 from raw.ingested_files where status = 'ingested'").fetchall()}
    except duckdb.Error:
        return set()


def landing_run_request(f: ReadyFile) -> dg.RunRequest:
    """The ingest run for one landing file (run_key from its content hash)."""
    return dg.RunRequest(
        run_key=f"landing:{f.sha256}",
        job_name=ingest_job.name,
        run_config=ingest_run_config([f.path]),
        tags={LANDING_FILE_TAG: f.relpath, LANDING_SHA_TAG: f.sha256},
    )


# ------------------------------------------------------------------ sensors


@dg.sensor(
    name="landing_sensor",
    job=ingest_job,
    minimum_interval_seconds=LANDING_INTERVAL_SECONDS,
    default_status=default_status(),
    description=(
        "Watches data/landing/ and starts one ingest_job run per new or changed file (run key = "
        "the file's sha256, so a re-dropped file starts nothing). Files with a temporary suffix "
        "(.tmp, .part, .partial, ...) or still growing are left for a later tick."
    ),
)
def landing_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Hand every complete new landing file to its own ingest run."""
    landing = paths().landing
    settle = env_number(SETTLE_ENV, DEFAULT_SETTLE_SECONDS, minimum=0)
    state = LandingState.from_cursor(context.cursor)
    ready, new_state, waiting = scan_landing(landing, state, settle_seconds=settle,
                                             ingested=lambda: ingested_shas(paths().serving))
    if waiting:
        context.log.info(f"{len(waiting)} landing file(s) still being written: {waiting[:5]}")
    requests = [landing_run_request(f) for f in ready]
    skip = None if requests else dg.SkipReason(
        f"no new complete files in {landing}" + (f" ({len(waiting)} still being written)"
                                               if waiting else "")
    )
    return dg.SensorResult(run_requests=requests, cursor=new_state.to_cursor(), skip_reason=skip)


@dg.sensor(
    name="clinic_partitions_sensor",
    minimum_interval_seconds=300,
    default_status=default_status(),
    description=(
        "Adds every clinic found in the serving snapshot as a report partition (the clinics "
        "dimension is dynamic). The publish step adds them too; this catches snapshots published "
        "by hand."
    ),
)
def clinic_partitions_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
    """Keep the dynamic clinic partitions in step with the data."""
    found = clinics_in_serving(paths().serving)
    known = set(context.instance.get_dynamic_partitions(clinic_partitions.name))
    new = [c for c in found if c not in known]
    if not new:
        return dg.SkipReason(f"all {len(found)} clinics already known")
    context.log.info(f"adding clinic partitions: {new}")
    return dg.SensorResult(dynamic_partitions_requests=[clinic_partitions.build_add_request(new)])


@dg.sensor(
    name="writer_run_reaper",
    minimum_interval_seconds=60,
    default_status=default_status(),
    description=(
        "Marks failed the writer runs whose process died (kill -9, the OOM killer, a reboot) and "
        "frees their duckdb_writer slots. Dagster's default run launcher never notices such a "
        "run: it stays STARTED, and the run queue's writer limit and the pool kept every later "
        "writer run (landing files, the nightly rebuild, the UI) queued for ever."
    ),
)
def writer_run_reaper(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    """Reap dead writer runs; never requests a run itself."""
    from orchestration.resources import reap_dead_writer_runs, run_lock_path

    reaped = reap_dead_writer_runs(context.instance, log=context.log.warning,
                                   lock_path=run_lock_path(paths().warehouse))
    return dg.SkipReason(f"marked failed: {', '.join(reaped)}" if reaped
                         else "no dead writer run")


SENSORS = [landing_sensor, clinic_partitions_sensor, writer_run_reaper]


def defs() -> dg.Definitions:
    return dg.Definitions(sensors=SENSORS)
