"""Orchestration: landing sensor, pools, the atomic serving snapshot, as-of rebuilds, the web UI.

Real components only: a simulated clinic network, the production ingest and SQL models, the real
Dagster definitions executed in-process on a persistent instance in a temporary data directory,
a second Python process holding the old snapshot open, and a real webserver answering GraphQL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import duckdb
import pytest

from alliance.config import REPO_ROOT, SQL_DIR

KEY = "orchestration-test-key-0123456789abcdef"
# Tables compared in the as-of test: every table a report or analyst reads.
COMPARED = ("core.sessions", "core.episodes", "core.questionnaire_scores", "marts.clinic_monthly",
            "marts.fct_alliance_sessions", "marts.fct_episode_outcomes")


def _fast_tmp(factory: pytest.TempPathFactory, name: str) -> Path:
    # Dagster's SQLite event log writes one row per event; on tmpfs a run is twice as fast.
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        return Path(tempfile.mkdtemp(prefix=f"alliance-{name}-", dir="/dev/shm"))
    return factory.mktemp(name)


def _rows(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple]:
    # DuckDB's parallel aggregation sums doubles in no fixed order (34.38 vs 34.379999999999995);
    # the last bits are noise, not history, so doubles are compared to 9 decimals.
    rows = con.execute(f"select * from {table} order by all").fetchall()
    return [tuple(round(v, 9) if isinstance(v, float) else v for v in r) for r in rows]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """A data directory whose warehouse knows the early files, with later files waiting.

    The early state is built with the library (ingest, seeds, models) and published as snapshot
    v1; its tables and its last recorded_at are kept as "the original output".
    """
    from alliance.ingest import ingest_files, landing_files
    from alliance.instruments import load_instruments, write_parameters_table, write_seed_tables
    from alliance.simulation import simulate
    from alliance.snapshot import publish_from_connection
    from alliance.sqlrunner import run_models

    root = _fast_tmp(tmp_path_factory, "orch")
    mp = pytest.MonkeyPatch()
    mp.setenv("ALLIANCE_DATA_DIR", str(root))
    mp.setenv("ALLIANCE_PSEUDONYM_KEY", KEY)
    mp.setenv("ALLIANCE_AUTOMATION", "off")
    from alliance.config import paths

    p = paths().ensure()
    export = root / "export"
    simulate(export, clinics=2, patients=50, months=4, therapists_per_clinic=3, seed=7,
             truth_path=root / "truth.json")
    files = landing_files(export)
    cut = int(len(files) * 0.6)
    early, late = files[:cut], files[cut:]
    for f in early:
        shutil.copy(f, p.landing / f.name)

    con = duckdb.connect(str(p.warehouse))
    ingest_files(con, [p.landing / f.name for f in early], KEY.encode(),
                 quarantine_dir=p.quarantine)
    write_seed_tables(con, load_instruments())
    write_parameters_table(con, SQL_DIR / "parameters.yml")
    run_models(con)
    original = {t: _rows(con, t) for t in COMPARED}
    cutoff = con.execute("select max(recorded_at) from raw.events").fetchone()[0]
    publish_from_connection(con, p.warehouse, p.serving, keep=3)
    con.close()
    try:
        yield {"paths": p, "late": late, "original": original, "cutoff": cutoff}
    finally:
        mp.undo()
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ landing sensor


def _write(path: Path, text: str, age: float | None = 60.0) -> Path:
    path.write_text(text)
    if age is not None:
        t = time.time() - age
        os.utime(path, (t, t))
    return path


def test_landing_sensor_one_run_per_new_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import dagster as dg

    from orchestration.sensors import landing_sensor

    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ALLIANCE_LANDING_SETTLE_SECONDS", "10")
    landing = tmp_path / "landing"
    landing.mkdir()
    a = _write(landing / "a.ndjson", '{"n": 1}\n')
    (landing / "sub").mkdir()
    _write(landing / "sub" / "b.ndjson", '{"n": 2}\n')
    _write(landing / "c.ndjson.part", '{"n": 3}\n')  # temporary suffix: still being copied
    growing = _write(landing / "d.ndjson", '{"n": 4', age=None)  # just written

    def tick(cursor: str | None) -> dg.SensorResult:
        with dg.instance_for_test() as instance, \
                dg.build_sensor_context(instance=instance, cursor=cursor) as ctx:
            return landing_sensor(ctx)

    r1 = tick(None)
    files1 = sorted(r.tags["alliance/landing_file"] for r in r1.run_requests)
    assert files1 == ["a.ndjson", "sub/b.ndjson"]
    sha_a = r1.run_requests[0].tags["alliance/sha256"]
    assert r1.run_requests[0].run_key == f"landing:{sha_a}"
    assert r1.run_requests[0].run_config["ops"]["ingest"]["config"]["files"] == [str(a.resolve())]

    # Repeat tick: nothing new. The growing file was seen once and is left alone while it changes.
    growing.write_text('{"n": 4, "more": true}\n')
    r2 = tick(r1.cursor)
    assert r2.run_requests == []
    # Unchanged since the previous tick: now it is complete.
    r3 = tick(r2.cursor)
    assert [r.tags["alliance/landing_file"] for r in r3.run_requests] == ["d.ndjson"]

    # A finished rename, a re-drop of known content under a new name, and a changed file.
    (landing / "c.ndjson.part").rename(landing / "c.ndjson")
    os.utime(landing / "c.ndjson", (time.time() - 60, time.time() - 60))
    _write(landing / "a-copy.ndjson", '{"n": 1}\n')
    _write(a, '{"n": 1}\n{"n": 5}\n')
    r4 = tick(r3.cursor)
    got = sorted(r.tags["alliance/landing_file"] for r in r4.run_requests)
    assert got == ["a.ndjson", "c.ndjson"]
    assert len({r.run_key for r in r4.run_requests} | {r.run_key for r in r1.run_requests}) == 4
    assert tick(r4.cursor).run_requests == []

    # Files the published warehouse already lists (e.g. ingested by `alliance demo`, not through
    # the sensor) start nothing, even with an empty cursor.
    from alliance.ingest import file_sha256

    serving = tmp_path / "serving" / "alliance.duckdb"
    serving.parent.mkdir(parents=True)
    with duckdb.connect(str(serving)) as con:
        con.execute("create schema raw; create table raw.ingested_files "
                    "(sha256 varchar, status varchar)")
        con.execute("insert into raw.ingested_files values (?, 'ingested'), (?, 'ingested')",
                    [file_sha256(a), file_sha256(landing / "c.ndjson")])
    os.utime(growing, (time.time() - 60, time.time() - 60))  # settled, whatever the test's pace
    fresh = sorted(r.tags["alliance/landing_file"] for r in tick(None).run_requests)
    assert fresh == ["a-copy.ndjson", "d.ndjson", "sub/b.ndjson"]  # a and c are known


def test_monthly_schedule_requests_last_month_per_known_clinic():
    import datetime as dt

    import dagster as dg

    from orchestration.partitions import clinic_partitions
    from orchestration.schedules import monthly_reports_schedule

    when = dt.datetime(2026, 3, 1, 5, tzinfo=dt.UTC)
    # Contexts are entered so they release the instance they resolve (Dagster keeps a global
    # reference otherwise, which breaks later definition loads in this process).
    with dg.instance_for_test() as instance:
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=when) as ctx:
            assert isinstance(monthly_reports_schedule(ctx), dg.SkipReason)  # no clinics yet
        instance.add_dynamic_partitions(clinic_partitions.name, ["north", "south"])
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=when) as ctx:
            requests = monthly_reports_schedule(ctx)
    assert [r.partition_key for r in requests] == ["north|2026-02", "south|2026-02"]
    assert len({r.run_key for r in requests}) == 2


def test_monthly_schedule_skips_a_month_that_is_no_partition_yet():
    import datetime as dt
    import zoneinfo

    import dagster as dg

    from orchestration.partitions import REPORTS_START, clinic_partitions
    from orchestration.schedules import monthly_reports_schedule, report_month

    # 05:00 on 1 March in Auckland is still 28 February in UTC, where the month partitions live
    auckland = dt.datetime(2026, 3, 1, 5, tzinfo=zoneinfo.ZoneInfo("Pacific/Auckland"))
    assert report_month(auckland) is None
    assert report_month(auckland + dt.timedelta(hours=13)) == "2026-02"
    start = dt.datetime.strptime(REPORTS_START, "%Y-%m").replace(tzinfo=dt.UTC)
    assert report_month(start + dt.timedelta(days=3)) is None  # the month before the first one
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(clinic_partitions.name, ["north"])
        with dg.build_schedule_context(instance=instance,
                                       scheduled_execution_time=auckland) as ctx:
            skipped = monthly_reports_schedule(ctx)
    assert isinstance(skipped, dg.SkipReason) and "2026-02" in skipped.skip_message
    assert "move the schedule later" in skipped.skip_message
    # a tick before the first month: the start is the reason, not the time of day
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(clinic_partitions.name, ["north"])
        with dg.build_schedule_context(instance=instance,
                                       scheduled_execution_time=start + dt.timedelta(days=3)) as ctx:
            early = monthly_reports_schedule(ctx)
    assert isinstance(early, dg.SkipReason)
    assert f"before $ALLIANCE_REPORTS_START={REPORTS_START}" in early.skip_message, early.skip_message


# ------------------------------------------------------------------ pool, publish, as-of


def test_definitions_wire_pool_jobs_schedules_and_sensors(world):
    import dagster as dg

    from orchestration.definitions import build_definitions
    from orchestration.instance import get_instance

    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    writers = [k for k in graph.materializable_asset_keys
               if graph.get(k).group_name in ("ingest", "seeds", "staging", "core", "marts",
                                              "publish")]
    assert dg.AssetKey(["serving", "snapshot"]) in writers
    assert all(graph.get(k).pools == {"duckdb_writer"} for k in writers), \
        [k for k in writers if graph.get(k).pools != {"duckdb_writer"}]
    # check steps that write the warehouse (check history, validated batches) hold the pool too
    nodes = {n.name: n.definition for n in defs.resolve_job_def("nightly_rebuild_job").graph.nodes}
    for name in ("raw__events_line_conservation", "raw_events_batch_suite"):
        assert nodes[name].pool == "duckdb_writer", name
    snap = graph.get(dg.AssetKey(["serving", "snapshot"]))
    assert dg.AssetKey(["marts", "clinic_monthly"]) in snap.parent_keys
    assert {s.name for s in defs.sensors} >= {"landing_sensor", "clinic_partitions_sensor"}
    assert {s.name for s in defs.schedules} >= {"nightly_rebuild_schedule",
                                                "monthly_reports_schedule"}
    for job in ("ingest_job", "nightly_rebuild_job", "asof_job", "reports_job", "publish_job"):
        assert defs.resolve_job_def(job).description
    instance = get_instance()
    assert {p.name: p.limit for p in instance.event_log_storage.get_pool_limits()} == {
        "duckdb_writer": 1}
    cfg = (world["paths"].dagster_home / "dagster.yaml").read_text()
    assert "default_limit: 1" in cfg and "alliance/writer" in cfg


READER = r"""
import sys, duckdb
con = duckdb.connect(sys.argv[1], read_only=True)
q = "select count(*) from raw.events"
print(con.execute(q).fetchone()[0], flush=True)
sys.stdin.readline()          # wait while the pipeline runs and swaps the snapshot
print(con.execute(q).fetchone()[0], flush=True)
print(con.execute("select count(*) from marts.clinic_monthly").fetchone()[0], flush=True)
"""


def test_full_run_while_analyst_holds_snapshot(world):
    from alliance.snapshot import list_history
    from orchestration.cli_ops import execute_job
    from orchestration.jobs import ingest_run_config

    p = world["paths"]
    inode_before = p.serving.stat().st_ino
    reader = subprocess.Popen([sys.executable, "-c", READER, str(p.serving)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        before = int(reader.stdout.readline())
        for f in world["late"]:
            shutil.copy(f, p.landing / f.name)
        out = execute_job("ingest_job", run_config=ingest_run_config(
            [p.landing / f.name for f in world["late"]]), log=lambda _m: None)
        assert out["success"], out
        assert reader.poll() is None, "the analyst's process died during the run"
        reader.stdin.write("\n")
        reader.stdin.flush()
        still, marts_rows = int(reader.stdout.readline()), int(reader.stdout.readline())
        assert reader.wait(timeout=30) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
    assert still == before, "the open snapshot changed under the analyst"
    assert marts_rows > 0
    assert p.serving.stat().st_ino != inode_before, "the snapshot was not swapped"
    with duckdb.connect(str(p.serving), read_only=True) as con:
        after = con.execute("select count(*) from raw.events").fetchone()[0]
    assert after > before
    assert len(list_history(p.serving)) == 2
    assert not list((p.serving_dir / ".incoming").glob("*"))


def test_gx_import_waits_until_the_ingest_is_done(world, monkeypatch):
    """In a run that ingests, the GX import starts after the ingest step, not beside it (it cost
    the CPU-bound ingest 2-2.5 s at 10^6 events) nor while Dagster records the step's results
    (0.05-0.08 s); in a run without, at the start."""
    import dagster as dg

    import assets.ingest as ingest_asset
    import quality.checks as checks
    import quality.gx_runner as gx_runner
    from orchestration.cli_ops import execute_job
    from orchestration.instance import get_instance
    from orchestration.jobs import ingest_run_config

    order: list[str] = []
    real_ingest = ingest_asset.ingest_files

    def ingest_files(*a, **kw):
        order.append("ingest started")
        out = real_ingest(*a, **kw)
        order.append("ingest done")
        return out

    monkeypatch.setattr(ingest_asset, "ingest_files", ingest_files)
    started: list[float] = []

    def preload() -> None:
        order.append("gx preload")
        started.append(time.time())

    for mod in (checks, gx_runner):
        monkeypatch.setattr(mod, "preload_in_background", preload)
    _ensure_late_files_published(world)
    order.clear()
    started.clear()
    p = world["paths"]
    out = execute_job("ingest_job", run_config=ingest_run_config(
        [p.landing / f.name for f in world["late"]]), log=lambda _m: None)
    assert out["success"], out
    assert order == ["ingest started", "ingest done", "gx preload"]
    ingest_done = [r.event_log_entry.timestamp for r in get_instance().get_records_for_run(
        out["run_id"], of_type=dg.DagsterEventType.STEP_SUCCESS).records
        if r.event_log_entry.step_key == "ingest"]
    assert len(ingest_done) == 1 and started[0] >= ingest_done[0]
    # a run whose steps use GX but do not ingest: the import starts with the run
    # (a resource key, not an annotation: this module uses postponed annotations)
    @dg.asset(required_resource_keys={"gx"})
    def validates() -> None:
        order.append("step")

    order.clear()
    assert dg.materialize([validates], resources={"gx": checks.GreatExpectationsResource()}).success
    assert order == ["gx preload", "step"]


def _ensure_late_files_published(world) -> None:
    """Ingest and publish the late files unless an earlier test of this module already did."""
    from orchestration.cli_ops import execute_job
    from orchestration.jobs import ingest_run_config

    p = world["paths"]
    with duckdb.connect(str(p.serving), read_only=True) as con:
        newer = con.execute("select count(*) from raw.events where recorded_at > ?",
                            [world["cutoff"]]).fetchone()[0]
    if newer:
        return
    for f in world["late"]:
        shutil.copy(f, p.landing / f.name)
    out = execute_job("ingest_job", run_config=ingest_run_config(
        [p.landing / f.name for f in world["late"]]), log=lambda _m: None)
    assert out["success"], out


def test_asof_rebuild_equals_original_after_corrections(world):
    from alliance.asof import as_of_dir
    from orchestration.cli_ops import execute_job

    p = world["paths"]
    cutoff = world["cutoff"]
    _ensure_late_files_published(world)  # so the test does not depend on the order of tests
    with duckdb.connect(str(p.serving), read_only=True) as con:
        later = con.execute(
            "select count(*) filter (where event_type in ('questionnaire.amended', "
            "'questionnaire.retracted')), count(*) from raw.events where recorded_at > ?",
            [cutoff]).fetchone()
        now_rows = {t: _rows(con, t) for t in COMPARED}
    assert later[0] > 0, "the late files should carry amendments or retractions"
    assert any(now_rows[t] != world["original"][t] for t in COMPARED), "nothing changed later"

    out = execute_job("asof_job", run_config={"ops": {"asof_rebuild": {"config": {
        "as_of": cutoff.isoformat()}}}}, log=lambda _m: None)
    assert out["success"], out
    db = as_of_dir(p.root, cutoff) / "alliance.duckdb"
    with duckdb.connect(str(db), read_only=True) as con:
        for t in COMPARED:
            assert _rows(con, t) == world["original"][t], f"{t} differs as of {cutoff}"
        assert con.execute("select max(recorded_at) from raw.events").fetchone()[0] == cutoff
        # the check history comes along, as evaluated by the cutoff (for the reports' section)
        assert con.execute("select count(*) filter (where evaluated_at > ?) from "
                           "quality.check_results", [cutoff]).fetchone()[0] == 0


def test_status_reports_runs_counts_and_snapshot_age(world, capsys):
    from orchestration.cli import main
    from orchestration.cli_ops import execute_job
    from orchestration.instance import get_instance

    # the runs it lists, whichever tests of this module ran before (or none)
    _ensure_late_files_published(world)
    if not any(r.job_name == "asof_job" for r in get_instance().get_runs(limit=50)):
        assert execute_job("asof_job", run_config={"ops": {"asof_rebuild": {"config": {
            "as_of": world["cutoff"].isoformat()}}}}, log=lambda _m: None)["success"]
    assert main(["status", "--json", "--runs", "50"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["snapshot"]["age_seconds"] is not None and st["snapshot"]["age_seconds"] < 600
    assert {r["job"] for r in st["runs"]} >= {"ingest_job", "asof_job"}
    assert st["row_counts"]["raw.events"] > 0
    assert isinstance(st["failing_checks"], list)
    # every landing file is published by now (_ensure_late_files_published): none waiting
    assert st["landing_files"] > 0 and st["landing_files_waiting"] == 0
    extra = world["paths"].landing / "waiting-2099-01-01.ndjson"
    extra.write_text("{}\n")
    try:
        assert main(["status", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["landing_files_waiting"] == 1
    finally:
        extra.unlink()
    # A published file replaced in place (a producer's corrected re-send under the same name)
    # waits again: it was counted as ingested, by its path. Same size or not.
    import os

    target = sorted(world["paths"].landing.glob("*.ndjson"))[0]
    original, stat = target.read_bytes(), target.stat()
    try:
        for new in (original + b"\n" + original.splitlines()[0] + b"\n",  # other size
                    original.replace(b'"schema_version": 1', b'"schema_version": 2', 1)
                    if b'"schema_version": 1' in original
                    else original.replace(b'"schema_version":1', b'"schema_version":2', 1)):
            target.write_bytes(new)
            assert main(["status", "--json"]) == 0
            assert json.loads(capsys.readouterr().out)["landing_files_waiting"] == 1, len(new)
    finally:
        target.write_bytes(original)
        os.utime(target, (stat.st_atime, stat.st_mtime))
    assert main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["landing_files_waiting"] == 0


HOLD_WRITER = r"""
import sys, duckdb
con = duckdb.connect(sys.argv[1])            # a writer: DuckDB then refuses every other process
print("holding", flush=True)
sys.stdin.readline()
"""


def test_status_shows_failing_check_only_the_warehouse_knows(world, capsys):
    """A failing check in the working warehouse is listed with failing_since; under a writer's
    lock status falls back to the snapshot (which never saw the failure)."""
    from orchestration.cli import main
    from orchestration.cli_ops import execute_job
    from quality.history import failing_checks

    p = world["paths"]
    with duckdb.connect(str(p.warehouse)) as con:  # one line of one file goes missing
        con.execute("update raw.ingested_files set lines_read = lines_read + 1 "
                    "where file_id = (select min(file_id) from raw.ingested_files)")
    try:
        out = execute_job("nightly_rebuild_job", select="group:ingest", log=lambda _m: None)
        assert not out["success"] and out["failed_checks"] >= 1, out
        capsys.readouterr()
        assert main(["status", "--json"]) == 0
        st = json.loads(capsys.readouterr().out)
        assert st["failing_checks_source"] == "warehouse"
        failing = {(f["asset"], f["check_name"]): f for f in st["failing_checks"]}
        lc = failing[("raw/events", "line_conservation")]
        assert lc["severity"] == "ERROR" and lc["unexpected_count"] == "1"
        assert lc["failing_since"] and lc["run_id"] == out["run_id"]
        # the snapshot cannot know: the failure happened after its publish
        assert ("raw/events", "line_conservation") not in {
            (f["asset"], f["check_name"]) for f in failing_checks(p.serving)}

        holder = subprocess.Popen([sys.executable, "-c", HOLD_WRITER, str(p.warehouse)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "holding"
            assert main(["status", "--json"]) == 0
            locked = json.loads(capsys.readouterr().out)
        finally:
            holder.communicate("\n", timeout=30)
        assert locked["failing_checks_source"] == "snapshot (warehouse locked by a writer)"
        assert locked["row_counts"]["raw.events"] > 0
        assert main(["status"]) == 0
        assert "line_conservation (1 failing; failing since" in capsys.readouterr().out

        # the failure blocks everything that reads raw.events: no model, no publish
        published = p.serving.stat().st_mtime_ns
        blocked = execute_job("nightly_rebuild_job", log=lambda _m: None)
        assert not blocked["success"]
        assert p.serving.stat().st_mtime_ns == published
    finally:
        with duckdb.connect(str(p.warehouse)) as con:
            con.execute("update raw.ingested_files set lines_read = lines_read - 1 "
                        "where file_id = (select min(file_id) from raw.ingested_files)")


# ------------------------------------------------------------------ the UI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_webserver_lists_assets_over_graphql(tmp_path: Path):
    port = _free_port()
    env = {**os.environ, "ALLIANCE_DATA_DIR": str(tmp_path), "DAGSTER_HOME": str(tmp_path),
           "ALLIANCE_AUTOMATION": "off"}
    web = Path(sys.executable).with_name("dagster-webserver")
    log = tmp_path / "webserver.log"
    # Output to a file, not a pipe: an unread pipe fills up and blocks the server.
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(web), "-m", "orchestration.definitions", "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    query = json.dumps({"query": (
        "{ assetNodes { assetKey { path } description } "
        "repositoriesOrError { ... on RepositoryConnection { nodes { "
        "sensors { name description } schedules { name description } "
        "jobs { name description } } } } }")})
    data = None
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/graphql",
                                             data=query.encode(),
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=5) as resp:
                    data = json.loads(resp.read())
                if data.get("data", {}).get("assetNodes"):
                    break
            except urllib.error.HTTPError as e:  # a malformed query: fail now, not in a minute
                raise AssertionError(e.read()[:500]) from e
            except OSError:
                pass
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert data is not None and data.get("data", {}).get("assetNodes"), \
        log.read_text(errors="replace")[-3000:]
    assert proc.returncode is not None, "the webserver did not stop"
    nodes = {"/".join(n["assetKey"]["path"]): n for n in data["data"]["assetNodes"]}
    assert {"raw/events", "serving/snapshot", "marts/clinic_monthly"} <= set(nodes)
    assert all(n["description"] for n in nodes.values()), \
        [k for k, n in nodes.items() if not n["description"]]
    (repo,) = data["data"]["repositoriesOrError"]["nodes"]
    named = {kind: {x["name"]: x["description"] for x in repo[kind]}
             for kind in ("sensors", "schedules", "jobs")}
    assert {"landing_sensor", "clinic_partitions_sensor"} <= set(named["sensors"])
    assert {"nightly_rebuild_schedule", "monthly_reports_schedule"} <= set(named["schedules"])
    assert {"ingest_job", "nightly_rebuild_job", "asof_job"} <= set(named["jobs"])
    undocumented = [n for kind in named.values() for n, d in kind.items()
                    if not d and not n.startswith("__")]
    assert not undocumented


def test_snapshot_carries_no_stale_bytes_of_the_working_file(tmp_path):
    """Freed blocks and unused block tails of the working warehouse may hold old bytes (DuckDB
    does not clear them; duckdb/duckdb#23382): the snapshot is a logical copy, so they stay out."""
    from alliance.snapshot import publish_from_connection

    wh = tmp_path / "w.duckdb"
    con = duckdb.connect(str(wh))
    marker = "PAT-STALE-BYTES-"
    # one long value (an overflow string, stored as it is) among many rows
    con.execute(f"create table junk as select case when range = 7 then '{marker}' || "
                f"(select string_agg(md5(i::varchar), '') from range(4000) t(i)) "
                f"else md5(range::varchar) end as s from range(200000)")
    con.execute("create schema raw")
    con.execute("create table raw.events as select range as x from range(300000)")
    con.execute("checkpoint")
    con.execute("drop table junk")
    con.execute("checkpoint")
    assert marker.encode() in wh.read_bytes()  # still in the working file, in freed blocks
    info = publish_from_connection(con, wh, tmp_path / "serving" / "alliance.duckdb")
    con.close()
    assert marker.encode() not in info.path.read_bytes()
    with duckdb.connect(str(info.path), read_only=True) as snap:
        assert snap.execute("select count(*) from raw.events").fetchone()[0] == 300000


def test_a_killed_publish_leaves_no_byte_copy_of_the_warehouse_under_serving(tmp_path, monkeypatch):
    """The byte copy of the working warehouse (which may hold raw-identifier fragments) sat in
    serving/.incoming while the snapshot was rewritten, and one left by a killed publish stayed
    there for good: the clean-up removed only *.partial files, and only after an hour."""
    import os
    import time

    from alliance import snapshot

    wh = tmp_path / "warehouse" / "w.duckdb"
    serving = tmp_path / "serving" / "alliance.duckdb"
    wh.parent.mkdir()
    con = duckdb.connect(str(wh))
    con.execute("create schema raw")
    con.execute("create table raw.events as select range as x from range(1000)")
    seen = []
    real = snapshot._clean_copy
    monkeypatch.setattr(snapshot, "_clean_copy", lambda src, dst: (seen.append(src), real(src, dst)))
    snapshot.publish_from_connection(con, wh, serving)
    con.close()
    [source] = seen
    assert source.parent == snapshot.source_dir(wh) and serving.parent not in source.parents
    # leftovers of publishes killed mid-way (kill -9 skips the clean-up of the failing publish)
    left = [serving.parent / ".incoming" / "alliance-1.duckdb.source",
            serving.parent / ".incoming" / "alliance-1.duckdb.partial",
            serving.parent / ".incoming" / "alliance-1.duckdb.partial.wal",
            snapshot.source_dir(wh) / "alliance-2.duckdb.source"]
    for f in left:
        f.write_bytes(b"x")
    spill = serving.parent / ".incoming" / "alliance-1.duckdb.partial.tmp"  # the copy's spill folder
    spill.mkdir()
    (spill / "duckdb_temp_storage-0.tmp").write_bytes(b"x")
    left.append(spill)
    recent = time.time() - 5
    for f in left:
        os.utime(f, (recent, recent))  # minutes old, not hours
    assert sorted(snapshot.clean_incoming(serving, wh)) == sorted(left)
    assert not any(f.exists() for f in left)


HOLD_RUN_LOCK = r"""
import sys, time
from pathlib import Path
from orchestration.resources import acquire_run_lock, release_run_lock
fd = acquire_run_lock(Path(sys.argv[1]), timeout_seconds=5)
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
release_run_lock(fd)
"""


def _run_while_another_writer_holds_the_lock(world, run, while_held=None) -> dict:
    """Hold the writer-run lock in another process for 3 s, call `while_held(lock)` and then
    `run()` (a job execution) meanwhile, and check that the run succeeded after waiting for the
    lock and said so in its log. Returns the run's result."""
    from orchestration.instance import get_instance
    from orchestration.resources import run_lock_path

    lock = run_lock_path(world["paths"].warehouse)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RUN_LOCK, str(lock), "3"],
                              stdout=subprocess.PIPE, text=True, cwd=str(Path.cwd()))
    try:
        assert holder.stdout.readline().strip() == "holding"
        if while_held is not None:
            while_held(lock)
        t0 = time.monotonic()
        out = run()
        waited = time.monotonic() - t0
    finally:
        holder.wait(timeout=30)
    assert out["success"], out
    assert waited >= 1.5
    logs = [e.user_message for e in get_instance().all_logs(out["run_id"])]
    assert any("waiting for another writer run" in m for m in logs)
    return out


def test_writer_runs_wait_for_each_other_however_launched(world, tmp_path):
    """A writer run launched from the CLI (outside the run queue) waits while another writer run
    holds the run lock, and proceeds when it is released; an absent holder times out clearly."""
    from orchestration.cli import main
    from orchestration.cli_ops import execute_job
    from orchestration.resources import acquire_run_lock, release_run_lock, run_lock_path

    def while_held(lock: Path) -> None:
        with pytest.raises(RuntimeError, match=r"another writer run \(pid \d+\)"):
            acquire_run_lock(lock, timeout_seconds=0.3)
        # reject-file writes the warehouse too: it refuses while a writer run holds the lock
        assert main(["reject-file", "1", "--reason", "test_data"]) == 2

    _run_while_another_writer_holds_the_lock(
        world, lambda: execute_job("publish_job", log=lambda _m: None), while_held)
    lock = run_lock_path(world["paths"].warehouse)
    release_run_lock(acquire_run_lock(lock, timeout_seconds=1))  # released by the run


def test_untagged_runs_that_write_the_warehouse_take_the_writer_lock(world, tmp_path, capsys):
    """A run of the implicit asset job (the UI's Materialize, `dg launch --assets`) carries no
    writer tag; when it writes the warehouse it still waits for the writer-run lock, and a
    selection of one asset of the ingest step runs the whole step instead of a traceback."""
    import dagster as dg

    from orchestration.cli import main
    from orchestration.execution import execute_job
    from orchestration.resources import is_writer_run

    def run(job: str, assets=None, checks=None, tags=None) -> dg.DagsterRun:
        return dg.DagsterRun(job_name=job, asset_selection=assets, asset_check_selection=checks,
                             tags=tags or {})

    key = dg.AssetKey
    assert is_writer_run(run("__ASSET_JOB", {key(["serving", "snapshot"])}))
    assert is_writer_run(run("__ASSET_JOB"))  # everything
    assert is_writer_run(run("__ASSET_JOB", set(),
                             {dg.AssetCheckKey(key(["raw", "events"]), "line_conservation")}))
    assert not is_writer_run(run("__ASSET_JOB", {key(["reports", "clinic_report"]),
                                                 key(["exports", "parquet"])}))
    assert not is_writer_run(run("reports_job"))
    assert is_writer_run(run("publish_job", tags={"alliance/writer": "true"}))

    _run_while_another_writer_holds_the_lock(
        world, lambda: execute_job("materialize", select="serving/snapshot", log=lambda _m: None))

    capsys.readouterr()
    assert main(["run", "--select", "raw/events"]) == 0
    printed = capsys.readouterr().out
    assert "with raw/ingested_files, raw/quarantine (made in the same step" in printed
    assert "(selection raw/events) succeeded" in printed
    # a selection reaching the partitioned clinic reports: they are left out (the run has no
    # partition: it failed after the snapshot had been published), and said so
    assert main(["run", "--select", 'key:"marts/clinic_monthly"+']) == 0
    printed = capsys.readouterr().out
    assert "left out (partitioned" in printed and "reports/clinic_report" in printed, printed
    assert "succeeded" in printed
    assert main(["run", "--select", 'key:"reports/clinic_report"']) == 2
    assert "names only partitioned assets (reports/clinic_report)" in capsys.readouterr().err


def test_lock_holder_is_named_whole_from_duckdbs_error(tmp_path: Path):
    """The retry log names the process holding the warehouse (a path with dots, its PID)."""
    from orchestration.resources import lock_holder_from_error

    db = tmp_path / "held.duckdb"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import duckdb, sys; c = duckdb.connect({str(db)!r}); "
         "print('ready', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(duckdb.IOException) as e:
            duckdb.connect(str(db))
        # DuckDB names the resolved program (python3.11 here: the old parser cut it at the dot)
        assert lock_holder_from_error(str(e.value)) == (
            f"{os.path.realpath(sys.executable)} (PID {holder.pid})")
    finally:
        holder.kill()
        holder.wait()


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def test_alliance_dev_stops_on_sigterm_when_started_in_the_background(tmp_path: Path):
    """A service manager stops `alliance dev` with SIGTERM, and a background start inherits
    SIGINT ignored: `dg dev` alone then kept running with its webserver and daemon."""
    port = _free_port()
    env = {**os.environ, "ALLIANCE_DATA_DIR": str(tmp_path), "ALLIANCE_AUTOMATION": "off"}
    env.pop("DAGSTER_HOME", None)
    log = tmp_path / "dev.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("alliance")), "dev", "--", "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.time() + 90
        up = False
        while time.time() < deadline and proc.poll() is None and not up:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=5):
                    up = True
            except OSError:
                time.sleep(0.5)
        assert up, log.read_text(errors="replace")[-3000:]
        assert len(_processes_mentioning(str(tmp_path))) >= 3  # dg dev, webserver, daemon
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=45)
        deadline = time.time() + 15
        while _processes_mentioning(str(tmp_path)) and time.time() < deadline:
            time.sleep(0.5)
        assert not _processes_mentioning(str(tmp_path)), "dg dev's processes outlived it"
    finally:
        for pid in _processes_mentioning(str(tmp_path)) + ([proc.pid] if proc.poll() is None else []):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_ingest_copy_keeps_every_same_named_file(tmp_path: Path):
    """`alliance ingest a/x b/x c/x`: three different files with one name all reach landing/
    (a time-stamped name gave two of them the same target and one was lost); the same content
    again is not copied twice."""
    from orchestration.cli_ops import copy_into_landing

    landing = tmp_path / "landing"
    sources = []
    for d, body in (("a", b'{"n": 1}\n'), ("b", b'{"n": 2}\n'), ("c", b'{"n": 3}\n')):
        (tmp_path / d).mkdir()
        (tmp_path / d / "dup.ndjson").write_bytes(body)
        sources.append(tmp_path / d / "dup.ndjson")
    targets = [copy_into_landing(s, landing) for s in sources]
    assert len(set(targets)) == 3
    assert sorted(t.read_bytes() for t in targets) == sorted(s.read_bytes() for s in sources)
    assert copy_into_landing(sources[1], landing) == targets[1]
    assert len(list(landing.iterdir())) == 3


def test_unreadable_file_is_a_warning_and_a_failed_ingest_command(world, tmp_path, capsys):
    """`alliance ingest` of a corrupt gzip: recorded as unreadable (never lost, never retried),
    the run's no_unreadable_files check warns, `alliance status` lists it, exit code 1."""
    from orchestration.cli import main
    from quality.history import failing_checks

    bad = tmp_path / "export-corrupt.ndjson.gz"
    bad.write_bytes(b"this is not gzip")
    assert main(["ingest", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "export-corrupt.ndjson.gz could not be read" in err and "Traceback" not in err
    p = world["paths"]
    with duckdb.connect(str(p.warehouse), read_only=True) as con:
        status, error = con.execute("select status, error from raw.ingested_files "
                                    "where file_name = 'export-corrupt.ndjson.gz'").fetchone()
    assert status == "unreadable" and error.count("export-corrupt.ndjson.gz") == 1
    failing = {(f["asset"], f["check_name"]): f for f in failing_checks(p.warehouse)}
    assert failing[("raw/ingested_files", "no_unreadable_files")]["severity"] == "WARN"


def test_history_keeps_data_versions_not_runs(tmp_path):
    """A publish that changed no data (a nightly run with no new file) replaces the newest
    history entry instead of pushing the last real change out of the kept snapshots; the serving
    file is still replaced (its check history is newer)."""
    from alliance.snapshot import list_history, publish_from_connection

    wh, serving = tmp_path / "w.duckdb", tmp_path / "serving" / "alliance.duckdb"
    con = duckdb.connect(str(wh))
    con.execute("create schema raw")
    con.execute("create table raw.events (event_id varchar, recorded_at timestamptz)")
    con.execute("create schema quality")
    con.execute("create table quality.check_results (run_id varchar)")

    def publish(run: str):
        con.execute(f"insert into quality.check_results values ('{run}')")
        return publish_from_connection(con, wh, serving, keep=3)

    def load(n: int) -> None:
        con.execute(f"insert into raw.events select 'e' || range, now() from range({n})")

    load(5)
    first = publish("r1")
    assert first.data_version and first.superseded is None
    again = publish("r2")  # nothing new: same data version
    assert again.data_version == first.data_version and again.superseded == first.history_path
    assert list_history(serving) == [again.history_path]
    with duckdb.connect(str(serving), read_only=True) as snap:  # the serving file is the new one
        assert snap.execute("select count(*) from quality.check_results").fetchone()[0] == 2
    load(3)
    changed = publish("r3")
    assert changed.data_version != first.data_version and changed.superseded is None
    for run in ("r4", "r5", "r6"):  # three quiet nights keep the snapshot before the last load
        publish(run)
    history = list_history(serving)
    assert len(history) == 2 and history[0] == again.history_path
    with duckdb.connect(str(history[0]), read_only=True) as snap:
        assert snap.execute("select count(*) from raw.events").fetchone()[0] == 5
    # no orphaned version files
    versions = sorted(p.name for p in serving.parent.joinpath("history").glob("*.version"))
    assert versions == sorted(p.name + ".version" for p in history)
    con.close()


@pytest.mark.parametrize(("env", "message"), [
    ({"ALLIANCE_NIGHTLY_CRON": "99 * * *"}, "ALLIANCE_NIGHTLY_CRON='99 * * *' is not a cron schedule"),
    ({"ALLIANCE_TIMEZONE": "Mars/Base"}, "ALLIANCE_TIMEZONE='Mars/Base' is not an IANA time zone"),
    ({"ALLIANCE_TIMEZONE": "Europe"}, "ALLIANCE_TIMEZONE='Europe' is not an IANA time zone"),
    ({"ALLIANCE_RUN_LOCK_TIMEOUT_SECONDS": "nan"}, "='nan' is not a finite number"),
    ({"ALLIANCE_REPORTS_START": "2025-13"}, "ALLIANCE_REPORTS_START='2025-13' is not a month"),
    ({"ALLIANCE_RUN_LOCK_TIMEOUT_SECONDS": "abc"}, "ALLIANCE_RUN_LOCK_TIMEOUT_SECONDS='abc' is not a number"),
])
def test_a_bad_setting_read_at_start_is_named_without_a_traceback(tmp_path: Path, env, message):
    """Read when the definitions load: a fresh process (they were tracebacks from Dagster)."""
    run = subprocess.run([sys.executable, "-m", "orchestration.cli", "run"], cwd=REPO_ROOT,
                         env={**os.environ, "ALLIANCE_DATA_DIR": str(tmp_path), "ALLIANCE_DEMO": "1",
                              "ALLIANCE_AUTOMATION": "off", **env},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, run.stderr


def test_bad_settings_and_arguments_are_named_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestration.cli import main

    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ALLIANCE_DEMO", "1")
    monkeypatch.setenv("ALLIANCE_AUTOMATION", "off")
    cases = [
        ({"ALLIANCE_SNAPSHOT_KEEP": "x"}, ["run"], "ALLIANCE_SNAPSHOT_KEEP='x' is not an integer"),
        # (checked before the run: it failed after the rebuild and the swap of the snapshot)
        ({"ALLIANCE_SNAPSHOT_KEEP": "-1"}, ["run"], "ALLIANCE_SNAPSHOT_KEEP='-1' must be at least 0"),
        ({"ALLIANCE_DUCKDB_MEMORY_LIMIT": "lots"}, ["run"], "is not a size DuckDB reads"),
        # (not finite: a lock timeout of nan waited for ever)
        ({"ALLIANCE_SNAPSHOT_KEEP": "nan"}, ["run"], "is not an integer"),
        # an empty cutoff (an unset shell variable) ran a full rebuild and publish
        ({}, ["run", "--as-of", ""], "as_of '' is not an ISO-8601 time"),
        ({}, ["demo", "--clinics", "0"], "--clinics and --patients must be at least 1"),
    ]
    for env, argv, message in cases:
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            assert main(argv) == 2, (env, argv)
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (env, argv, err)
    assert not (tmp_path / "data" / "landing").exists() or not any(
        (tmp_path / "data" / "landing").iterdir())  # nothing simulated or run
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(tmp_path / "afile"))
    assert main(["status"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize(("text", "message"), [
    ("concurrency:\n  pools: [1\n", "while parsing a flow sequence"),
    ("concurrency:\n  poolz: 1\n", 'unexpected config entry "poolz"'),
    ("just a string\n", "cannot be read"),  # not a mapping
    ("concurrency: 5\n", "cannot be read"),
])
def test_an_edited_dagster_yaml_that_cannot_be_read_is_named_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], text, message
) -> None:
    """The file is the operator's once its header is gone; a mistake in it was a traceback from
    Dagster's config loader in every command that opens the instance."""
    from orchestration.cli import main

    cfg = tmp_path / "data" / "dagster" / "dagster.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(text)
    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("ALLIANCE_DEMO", "1")
    monkeypatch.setenv("ALLIANCE_AUTOMATION", "off")
    for argv in (["status"], ["run"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"{cfg}: the Dagster instance settings cannot be read" in err, err
        assert message in err and "delete it" in err and "Traceback" not in err, err
    assert cfg.read_text() == text  # the operator's file is left as it is


def test_alliance_dg_runs_dg_on_the_platform_instance_and_writes_nothing_home(tmp_path: Path):
    """`dg` alone uses ~/.dagster for its usage telemetry (it reads the off switch only from
    DAGSTER_HOME's dagster.yaml or the user's dg config): nothing may be written outside data/."""
    home, data = tmp_path / "home", tmp_path / "data"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "VIRTUAL_ENV")}
    run = subprocess.run([sys.executable, "-m", "orchestration.cli", "dg", "check", "defs"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                         env={**env, "HOME": str(home), "ALLIANCE_DATA_DIR": str(data),
                              "ALLIANCE_DEMO": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "All definitions loaded successfully" in run.stdout + run.stderr
    assert "virtual environment does not match" not in run.stdout + run.stderr
    assert list(home.rglob("*")) == []
    assert (data / "dagster" / "dagster.yaml").read_text().startswith("# Managed by")
    # dg's own options pass through (argparse took --help and refused --version)
    version = subprocess.run([sys.executable, "-m", "orchestration.cli", "dg", "--version"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                             env={**env, "HOME": str(home), "ALLIANCE_DATA_DIR": str(data),
                                  "ALLIANCE_DEMO": "1"})
    assert version.returncode == 0 and "dg, version" in version.stdout, version.stderr


def test_a_damaged_duckdb_file_is_named_not_taken_for_a_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A truncated warehouse read as 'locked by a writer' in status and reject-file; a truncated
    snapshot crashed status and report with tracebacks."""
    from orchestration.cli import main

    data = tmp_path / "data"
    (data / "warehouse").mkdir(parents=True)
    (data / "serving").mkdir()
    good = tmp_path / "good.duckdb"
    with duckdb.connect(str(good)) as con:
        con.execute("create table t as select range as i, repeat('x', 100) as s from range(200000)")
    for target in (data / "warehouse" / "alliance.duckdb", data / "serving" / "alliance.duckdb"):
        target.write_bytes(good.read_bytes()[:100_000])  # cut short
    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(data))
    monkeypatch.setenv("ALLIANCE_DEMO", "1")
    assert main(["reject-file", "1", "--reason", "other"]) == 2
    err = capsys.readouterr().err
    assert "cannot open the warehouse" in err and "in use by a running job" not in err
    for argv in (["status"], ["report", "--clinic", "c1", "--month", "2025-01"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "DuckDB could not open, read or write a file" in err and "serving" in err
        assert "Traceback" not in err
    # with a readable snapshot, status reads its checks there and says why
    (data / "serving" / "alliance.duckdb").unlink()
    duckdb.connect(str(data / "serving" / "alliance.duckdb")).close()
    main(["status"])
    out = capsys.readouterr().out
    assert "snapshot (warehouse unreadable: IO Error" in out and "locked by a writer" not in out


def test_a_failed_step_is_summed_up_in_one_line() -> None:
    """The line that says what to do is printed last, not lost in the wrappers' stack."""
    import dagster as dg

    from orchestration.execution import failed_step_lines

    @dg.op
    def fine() -> int:
        return 1

    @dg.op
    def waits(x: int) -> None:
        raise RuntimeError(f"the warehouse lock is held by pid 4242 (after {x} waits); retry later\n"
                           "second line of detail")

    @dg.job
    def j():
        waits(fine())

    result = j.execute_in_process(raise_on_error=False)
    assert failed_step_lines(result) == [
        "  step waits failed: RuntimeError: the warehouse lock is held by pid 4242 (after 1 waits); "
        "retry later"]

    # a resource that fails to start (the writer-run lock's wait gives up there)
    class Locked(dg.ConfigurableResource):
        def setup_for_execution(self, context) -> None:
            raise RuntimeError("another writer run (pid 77) holds the lock; this run gives up")

    @dg.op(required_resource_keys={"locked"})  # (the module's postponed annotations)
    def uses() -> None:
        return None

    @dg.job(resource_defs={"locked": Locked()})
    def k():
        uses()

    lines = failed_step_lines(k.execute_in_process(raise_on_error=False))
    assert any("RuntimeError: another writer run (pid 77) holds the lock" in x for x in lines), lines


def test_status_knows_the_files_of_a_moved_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The manifest lists files under their absolute paths: a moved or restored data directory
    showed every landing file as not ingested."""
    from orchestration.cli import main

    data = tmp_path / "moved" / "data"
    (data / "landing" / "2025").mkdir(parents=True)
    (data / "serving").mkdir()
    for name in ("2025/a.ndjson", "b.ndjson", "new.ndjson"):
        (data / "landing" / name).write_text("{}\n")
    with duckdb.connect(str(data / "serving" / "alliance.duckdb")) as con:
        con.execute("create schema raw; create table raw.ingested_files (path varchar, "
                    "bytes bigint, sha256 varchar, finished_at timestamptz)")
        sha = hashlib.sha256(b"{}\n").hexdigest()
        con.execute("insert into raw.ingested_files values "
                    f"('/old/place/data/landing/2025/a.ndjson', 3, '{sha}', now()), "
                    f"('/old/place/data/landing/b.ndjson', 3, '{sha}', now())")
    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(data))
    monkeypatch.setenv("ALLIANCE_DEMO", "1")
    main(["status"])
    assert "files in landing/: 3, 1 not ingested as of the snapshot" in capsys.readouterr().out


def test_settings_duckdb_reads_are_accepted_and_lock_wording_is_duckdbs(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    import duckdb as ddb

    from alliance.config import warehouse_config
    from orchestration.resources import _is_lock_error

    for size in ("4G", "500M", "1.5GB", "4 GiB"):  # what DuckDB itself reads
        monkeypatch.setenv("ALLIANCE_DUCKDB_MEMORY_LIMIT", size)
        assert warehouse_config() == {"memory_limit": size}
    # a damaged file under a folder named 'blocks' is not a lock; DuckDB's lock message is
    assert not _is_lock_error(ddb.IOException(
        'IO Error: Could not read enough bytes from file "/data/blocks/alliance.duckdb"'))
    assert _is_lock_error(ddb.IOException(
        'IO Error: Could not set lock on file "/d/alliance.duckdb": Conflicting lock is held in '
        "/usr/bin/python3 (PID 42)"))


DEAD_RUN_THEN_INGEST = r"""
import sys, uuid
import dagster as dg
from orchestration.instance import WRITER_POOL, get_instance
from orchestration.jobs import WRITER_TAG
from orchestration.execution import execute_job

instance = get_instance()
dead = instance.add_run(dg.DagsterRun(job_name="nightly_rebuild_job", run_id=str(uuid.uuid4()),
                                      status=dg.DagsterRunStatus.STARTED, tags={WRITER_TAG: "true"}))
claim = instance.event_log_storage.claim_concurrency_slot(WRITER_POOL, dead.run_id, "sql_models")
assert claim.is_claimed, claim
out = execute_job("ingest_job", tags={WRITER_TAG: "true"}, log=lambda m: print(m, flush=True))
info = instance.event_log_storage.get_concurrency_info(WRITER_POOL)
print("RESULT", out["success"], instance.get_run_by_id(dead.run_id).status.value, len(info.claimed_slots))
import os
print("PID", instance.get_run_by_id(out["run_id"]).tags.get("alliance/pid") == str(os.getpid()))
"""


def test_a_writer_run_killed_while_it_held_the_pool_slot_does_not_block_the_next(tmp_path: Path):
    """kill -9 (or the OOM killer) during a writer step left the pool's one slot claimed by a run
    that stayed STARTED: every later writer run waited for the slot for ever, silently."""
    env = {**os.environ, "ALLIANCE_DATA_DIR": str(tmp_path / "data"), "ALLIANCE_DEMO": "1",
           "ALLIANCE_AUTOMATION": "off"}
    env.pop("DAGSTER_HOME", None)
    run = subprocess.run([sys.executable, "-c", DEAD_RUN_THEN_INGEST], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "RESULT True FAILURE 0" in run.stdout, run.stdout[-3000:]
    assert "PID True" in run.stdout  # the run recorded its process, for the reaper
    assert "its process is gone" in run.stdout + run.stderr


def test_dead_writer_runs_are_reaped_and_live_ones_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dagster's default launcher never notices a run whose process was killed: it stayed
    STARTED, the run queue's writer limit counted it as running and no queued writer run (landing
    files, nightly rebuild, UI) started again. The reaper judges by the recorded process."""
    import socket
    import time
    import uuid

    import dagster as dg

    from orchestration.instance import WRITER_POOL, get_instance
    from orchestration.jobs import WRITER_TAG
    from orchestration.resources import HOST_TAG, PID_TAG, reap_dead_writer_runs
    from orchestration.sensors import writer_run_reaper

    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(tmp_path / "data"))
    instance = get_instance()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    host = socket.gethostname()

    def run(job: str, tags: dict) -> str:
        r = instance.add_run(dg.DagsterRun(job_name=job, run_id=str(uuid.uuid4()),
                                           status=dg.DagsterRunStatus.STARTED, tags=tags))
        return r.run_id

    writer = {WRITER_TAG: "true"}
    dead = run("nightly_rebuild_job", {**writer, PID_TAG: str(gone.pid), HOST_TAG: host})
    live = run("nightly_rebuild_job", {**writer, PID_TAG: str(os.getpid()), HOST_TAG: host})
    elsewhere = run("ingest_job", {**writer, PID_TAG: str(gone.pid), HOST_TAG: host + "-other"})
    no_pid = run("ingest_job", writer)  # killed before its resources started
    reader = run("reports_job", {PID_TAG: str(gone.pid), HOST_TAG: host})  # not a writer run
    assert instance.event_log_storage.claim_concurrency_slot(WRITER_POOL, dead, "sql_models").is_claimed

    def status(run_id: str) -> str:
        return instance.get_run_by_id(run_id).status.value

    # status tells a dead run from a live one before anything reaps it
    from orchestration.cli_ops import collect_status

    gone_in_status = {r["run_id"]: r["process_gone"] for r in collect_status(20)["runs"]}
    assert gone_in_status[dead[:8]] and not gone_in_status[live[:8]]
    with dg.build_sensor_context(instance=instance) as ctx:
        skip = writer_run_reaper(ctx)
    assert dead in skip.skip_message
    assert status(dead) == "FAILURE"
    assert not instance.event_log_storage.get_concurrency_info(WRITER_POOL).claimed_slots
    assert {status(r) for r in (live, elsewhere, no_pid, reader)} == {"STARTED"}
    # no process recorded: dead only once the grace period is over and no writer run holds the
    # warehouse (a writer run whose steps need no warehouse records none; it may hold the lock)
    from orchestration.resources import (
        BOOT_TAG,
        PROC_START_TAG,
        _boot_id,
        _proc_start,
        acquire_run_lock,
        release_run_lock,
    )

    lock = tmp_path / "run.lock"
    fd = acquire_run_lock(lock, timeout_seconds=1)
    try:
        assert reap_dead_writer_runs(instance, now=time.time() + 3600, lock_path=lock) == []
    finally:
        release_run_lock(fd)
    assert reap_dead_writer_runs(instance, now=time.time() + 3600, lock_path=lock) == [no_pid]
    assert status(no_pid) == "FAILURE"
    assert {status(r) for r in (live, elsewhere, reader)} == {"STARTED"}
    # a pid reused by another process (another boot, or another start time) is no proof of life
    me = {**writer, PID_TAG: str(os.getpid()), HOST_TAG: host}
    same = run("ingest_job", {**me, PROC_START_TAG: _proc_start(os.getpid()), BOOT_TAG: _boot_id()})
    reused = run("ingest_job", {**me, PROC_START_TAG: "1", BOOT_TAG: _boot_id()})
    rebooted = run("ingest_job", {**me, PROC_START_TAG: _proc_start(os.getpid()),
                                  BOOT_TAG: "another-boot"})
    assert sorted(reap_dead_writer_runs(instance)) == sorted([reused, rebooted])
    assert status(same) == "STARTED"
    # a run that finished after it was listed keeps its success
    done = instance.add_run(dg.DagsterRun(job_name="ingest_job", run_id=str(uuid.uuid4()),
                                          status=dg.DagsterRunStatus.SUCCESS,
                                          tags={**writer, PID_TAG: str(gone.pid), HOST_TAG: host}))
    stale = done.with_status(dg.DagsterRunStatus.STARTED)
    monkeypatch.setattr(instance, "get_runs", lambda *a, **k: [stale])
    assert reap_dead_writer_runs(instance) == []
    assert status(done.run_id) == "SUCCESS"


FAILING_CLEANUP_TWICE = r"""
import orchestration.resources as res
from orchestration.execution import execute_job
from orchestration.jobs import WRITER_TAG

def boom(*a, **k):
    raise RuntimeError("storage hiccup")

res.free_dead_writer_slots = boom
ok = [execute_job("ingest_job", tags={WRITER_TAG: "true"}, log=lambda m: print(m, flush=True))["success"]
      for _ in range(2)]
print("RESULT", ok)
"""


def test_a_failing_dead_run_check_does_not_keep_the_writer_lock(tmp_path: Path):
    """Dagster does not tear down a resource whose setup raised: an error after the lock was
    taken kept it for the rest of the process, and its next writer run waited for it."""
    env = {**os.environ, "ALLIANCE_DATA_DIR": str(tmp_path / "data"), "ALLIANCE_DEMO": "1",
           "ALLIANCE_AUTOMATION": "off", "ALLIANCE_RUN_LOCK_TIMEOUT_SECONDS": "5"}
    env.pop("DAGSTER_HOME", None)
    run = subprocess.run([sys.executable, "-c", FAILING_CLEANUP_TWICE], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=240)
    assert "RESULT [True, True]" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
    assert "could not check the writer pool for runs that died: storage hiccup" in run.stdout + run.stderr


def test_the_snapshot_copy_has_the_warehouse_memory_limit(tmp_path, monkeypatch):
    """The publish rewrites the warehouse in a child process; with DuckDB's default memory limit
    (80% of RAM) that copy reached 8.7 GB at 10^7 events. It gets $ALLIANCE_DUCKDB_MEMORY_LIMIT
    like every warehouse connection: at an impossibly small limit the copy fails, and says so."""
    from alliance import snapshot

    wh = tmp_path / "warehouse" / "w.duckdb"
    wh.parent.mkdir()
    con = duckdb.connect(str(wh))
    con.execute("create schema raw")
    con.execute("create table raw.events as select range as x, md5(range::varchar) as h "
                "from range(300000)")
    monkeypatch.setenv("ALLIANCE_DUCKDB_MEMORY_LIMIT", "1MB")
    with pytest.raises(snapshot.SnapshotError, match="(?i)memory"):
        snapshot.publish_from_connection(con, wh, tmp_path / "serving" / "alliance.duckdb")
    monkeypatch.delenv("ALLIANCE_DUCKDB_MEMORY_LIMIT")
    info = snapshot.publish_from_connection(con, wh, tmp_path / "serving" / "alliance.duckdb")
    con.close()
    with duckdb.connect(str(info.path), read_only=True) as snap:
        assert snap.execute("select count(*) from raw.events").fetchone()[0] == 300000
