"""`alliance run`, `alliance ingest`, `alliance status`, `alliance reject-file`, `alliance dev`: the
operator's commands.

Thin wrappers over the same Dagster definitions the UI shows: each command executes a job from
orchestration.definitions in this process against the persistent instance under data/dagster, so
its run, logs and check results appear in `dg dev` and it waits for the same duckdb_writer pool.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alliance.config import DataPaths, paths
from orchestration.execution import execute_job

if TYPE_CHECKING:
    from alliance.rejections import Rejection


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "run",
        help="run the pipeline (or a selection) now, or an as-of rebuild",
        description="Without options: the nightly full rebuild (ingest, seeds, staging, core, "
        "marts, checks, publish, exports). --select takes Dagster's asset selection syntax, "
        "e.g. 'group:marts', 'key:\"core/sessions\"+', '+key:\"serving/snapshot\"'. --as-of "
        "rebuilds every model from events recorded up to that time into data/asof/<time>/.",
    )
    r.add_argument("--select", help="asset selection (Dagster selection syntax)")
    r.add_argument("--as-of", dest="as_of", help="recorded_at cutoff, ISO-8601 (e.g. 2026-03-01)")
    r.add_argument("--clinic", default="", help="with --as-of and --month: render that report")
    r.add_argument("--month", default="", help="YYYY-MM, with --as-of and --clinic")
    r.set_defaults(func=cmd_run)

    i = sub.add_parser(
        "ingest",
        help="copy export files into landing/ and ingest them (then rebuild and publish)",
        description="Copies each PATH into data/landing/ (atomically: never visible half-copied) "
        "and runs ingest_job for it: ingest, rebuild, checks, publish. Re-ingesting a file already "
        "ingested changes nothing.",
    )
    i.add_argument("paths", nargs="+", metavar="PATH")
    i.set_defaults(func=cmd_ingest)

    s = sub.add_parser("status", help="last runs, row counts, failing checks, snapshot age")
    s.add_argument("--runs", type=int, default=8, help="how many recent runs to list")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    from alliance.rejections import REASON_CODES

    j = sub.add_parser(
        "reject-file",
        help="reject ingested files whose events failed a blocking check (nothing is deleted)",
        description="Records in raw.rejected_files that the files (by file_id or file name, see "
        "raw.ingested_files or the failing check's keys) are rejected: their events leave "
        "staging and every model from the next run (a full rebuild), the batch suite stops "
        "re-checking them, and a corrected export reusing their event ids is accepted. Run the "
        "pipeline afterwards (alliance run) to rebuild and publish. Reason codes: "
        + "; ".join(f"{k} = {v}" for k, v in REASON_CODES.items()) + ".",
    )
    j.add_argument("files", nargs="+", metavar="FILE", help="file_id or file name")
    j.add_argument("--reason", required=True, choices=sorted(REASON_CODES))
    j.set_defaults(func=cmd_reject_file)

    d = sub.add_parser(
        "dev",
        help="start the Dagster UI and daemon (dg dev) on the persistent instance",
        description="Writes data/dagster/dagster.yaml, sets DAGSTER_HOME=data/dagster and runs "
        "`dg dev`; extra arguments are passed on (e.g. alliance dev -- --port 3001).",
    )
    d.add_argument("dg_args", nargs=argparse.REMAINDER)
    d.set_defaults(func=cmd_dev)

    g = sub.add_parser(
        "dg",
        help="any dg command on the persistent instance (e.g. alliance dg check defs)",
        description="Writes data/dagster/dagster.yaml, sets DAGSTER_HOME=data/dagster and runs "
        "`dg` with the arguments given: `alliance dg check defs`, `alliance dg launch --assets "
        "reports/clinic_report --partition 'clinic-01|2025-06'`. Runs and launches land in the "
        "platform's run history, wait for its writer pool, and dg's usage telemetry stays off "
        "(dg reads that setting from DAGSTER_HOME; without it, dg wrote ~/.dagster).",
    )
    g.add_argument("dg_args", nargs=argparse.REMAINDER)
    g.set_defaults(func=cmd_dg)


def cmd_run(args: argparse.Namespace) -> int:
    from orchestration.jobs import nightly_rebuild_job

    if args.as_of is not None:  # (an empty value is an error, not a full rebuild and publish)
        from alliance.asof import AsOfError, parse_as_of

        try:
            cutoff = parse_as_of(args.as_of)
        except AsOfError as e:
            print(f"alliance run --as-of: {e}", file=sys.stderr)
            return 2
        if bool(args.clinic) != bool(args.month):
            print("alliance run --as-of: give both --clinic and --month, or neither",
                  file=sys.stderr)
            return 2
        # Checked before the rebuild (minutes on a large warehouse), not after it.
        problem = _asof_problem(args.clinic, args.month)
        if problem:
            print(f"alliance run --as-of: {problem}", file=sys.stderr)
            return 2
        if args.month:
            from alliance.report.data import parse_month

            args.month = f"{parse_month(args.month):%Y-%m}"
        config = {"ops": {"asof_rebuild": {"config": {
            "as_of": cutoff.isoformat(), "clinic": args.clinic, "month": args.month}}}}
        out = execute_job("asof_job", run_config=config, tags={"alliance/as_of": cutoff.isoformat()})
        if out["success"]:
            from alliance.asof import as_of_dir

            print(as_of_dir(paths().root, cutoff) / "alliance.duckdb")
        return 0 if out["success"] else 1
    if args.clinic or args.month:  # only meaningful with --as-of: not a silent full rebuild
        print("alliance run: --clinic and --month go with --as-of (a past report); for the "
              "current one use `alliance report --clinic C --month YYYY-MM`", file=sys.stderr)
        return 2
    from orchestration.execution import resolve_selection
    from orchestration.jobs import INGEST_KEYS

    try:
        whole = resolve_selection(args.select)[1] if args.select else None
    except SystemExit as e:  # a selection that cannot run: one line and exit code 2
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr)
        return 2
    if whole is None or whole & set(INGEST_KEYS):
        # The run starts with the ingest, which needs the pseudonym key: a missing key is one
        # line from `alliance` (MissingKeyError), not a failed step with a traceback in the log.
        from assets.ingest import pseudonym_key
        from orchestration.resources import default_resources

        pseudonym_key(default_resources()["settings"])
    elif not _event_log_state()[0]:
        print(f"alliance run --select {args.select}: the warehouse has no events yet; run "
              "`alliance run` (or `alliance ingest FILE`) first", file=sys.stderr)
        return 2
    out = execute_job(nightly_rebuild_job.name, select=args.select,
                      tags={"alliance/writer": "true"})
    return 0 if out["success"] else 1


def _event_log_state(clinic: str | None = None) -> tuple[bool, bool | None]:
    """(the working warehouse has raw.events, `clinic` has events there) from one read-only look.

    Both are (True, None) when the file cannot be read: a writer holds it, and the run will wait
    for it and report what it finds. The clinic part is None when no clinic is asked for.
    """
    import duckdb

    wh = paths().warehouse
    if not wh.exists():
        return False, False if clinic else None
    try:
        with duckdb.connect(str(wh), read_only=True) as con:
            if not con.execute("select count(*) from duckdb_tables() where schema_name = 'raw'"
                               " and table_name = 'events'").fetchone()[0]:
                return False, False if clinic else None
            if not clinic:
                return True, None
            return True, bool(con.execute("select count(*) from raw.events where clinic_id = ?",
                                          [clinic]).fetchone()[0])
    except duckdb.Error:
        return True, None


def _asof_problem(clinic: str | None, month: str | None) -> str | None:
    """What makes an as-of request impossible, found before any work: a malformed month, no
    event log yet, or a clinic the log has never seen."""
    if month:
        from alliance.report.data import parse_month

        try:
            parse_month(month)
        except ValueError as e:
            return str(e)
    has_log, clinic_known = _event_log_state(clinic)
    if not has_log:
        return "the warehouse has no events yet; ingest something first (`alliance run`)"
    if clinic_known is False:
        return f"clinic {clinic!r} has no events in the warehouse"
    return None


def copy_into_landing(src: Path, landing: Path) -> Path:
    """Copy a file into landing/ so that no reader ever sees it half-copied; returns the target.

    The copy is written under a `.partial` name (which the landing sensor and the ingest ignore)
    and renamed into place. A file already in landing/ is used where it is.
    """
    src = src.resolve()
    landing = landing.resolve()
    if landing in src.parents:
        return src
    data = src.read_bytes()
    target = landing / src.name
    if target.exists() and target.read_bytes() == data:
        return target
    if target.exists():
        # A different file with the same name: keep both, the new one named by its content (a
        # time stamp gave two same-named sources of one call the same name: one was lost).
        base, suffixes = src.name.split(".")[0], "".join(src.suffixes)
        stem = f"{base}-{hashlib.sha256(data).hexdigest()[:12]}"
        target, n = landing / f"{stem}{suffixes}", 2
        while target.exists() and target.read_bytes() != data:
            target, n = landing / f"{stem}-{n}{suffixes}", n + 1
        if target.exists():
            return target
    partial = target.with_name(target.name + ".partial")
    landing.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(data)
    os.replace(partial, target)
    return target


def cmd_ingest(args: argparse.Namespace) -> int:
    from alliance.ingest import LANDING_SUFFIXES, file_sha256
    from assets.ingest import pseudonym_key
    from orchestration.jobs import LANDING_FILE_TAG, LANDING_SHA_TAG, ingest_job, ingest_run_config
    from orchestration.resources import default_resources

    p = paths().ensure()
    # Checked before anything is copied into landing/: the paths, then the key (MissingKeyError
    # is reported by `alliance` itself, without a traceback).
    # What the landing sensor and the nightly run take; anything else (a CSV, say) would be
    # read as NDJSON line by line and quarantined whole, or never be picked up again.
    other = [raw for raw in args.paths if not str(raw).endswith(LANDING_SUFFIXES)]
    if other:
        for raw in other:
            print(f"alliance ingest: {raw}: not an NDJSON export (expected "
                  f"{', '.join(LANDING_SUFFIXES)}); CSV, FHIR and REDCap go through "
                  "`alliance import`", file=sys.stderr)
        return 2
    missing = [raw for raw in args.paths if not Path(raw).is_file()]
    if missing:
        for raw in missing:
            print(f"alliance ingest: {raw}: no such file", file=sys.stderr)
        return 2
    pseudonym_key(default_resources()["settings"])
    targets = [copy_into_landing(Path(raw), p.landing) for raw in args.paths]
    ok = True
    for t in targets:
        rel = t.relative_to(p.landing.resolve()).as_posix()
        print(f"ingesting {rel}")
        out = execute_job(
            ingest_job.name,
            run_config=ingest_run_config([t]),
            tags={LANDING_FILE_TAG: rel, LANDING_SHA_TAG: file_sha256(t)},
        )
        ok = ok and out["success"]
        if "raw/ingested_files:no_unreadable_files" in out.get("failed_check_names", []):
            # recorded (raw.ingested_files, status unreadable, with the error) but not read
            print(f"alliance ingest: {rel} could not be read (see the run's log or "
                  "raw.ingested_files.error); nothing of it was ingested", file=sys.stderr)
            ok = False
    return 0 if ok else 1


# ------------------------------------------------------------------ status


def _fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "never published"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


_FAILING_FIELDS = ("asset", "check_name", "severity", "unexpected_count", "failing_since",
                   "evaluated_at", "run_id")


def collect_status(n_runs: int = 8) -> dict[str, Any]:
    """Everything `alliance status` shows, as data (the snapshot is opened read-only)."""
    import duckdb

    from alliance import snapshot
    from alliance.ingest import file_sha256, landing_files
    from orchestration.instance import get_instance
    from orchestration.resources import process_gone

    p = paths()
    landing = landing_files(p.landing)
    instance = get_instance(p)
    runs = []
    for r in instance.get_runs(limit=n_runs):
        stats = instance.get_run_stats(r.run_id)
        start, end = stats.start_time, stats.end_time
        runs.append({
            "run_id": r.run_id[:8],
            "job": r.job_name,
            "status": r.status.value,
            "started": datetime.fromtimestamp(start, UTC).isoformat(timespec="seconds")
            if start else None,
            "seconds": round(end - start, 1) if start and end else None,
            "landing_file": r.tags.get("alliance/landing_file"),
            # an unfinished run whose recorded process is gone died (kill -9, OOM): the reaper
            # sensor or the next writer run marks it failed
            "process_gone": (not r.is_finished and process_gone(r)),
        })
    out: dict[str, Any] = {
        "data_dir": str(p.root),
        "runs": runs,
        "snapshot": {
            "path": str(p.serving),
            "age_seconds": snapshot.snapshot_age_seconds(p.serving),
            "history": [h.name for h in snapshot.list_history(p.serving)],
        },
        "landing_files": len(landing),
        "landing_files_waiting": None,
        "row_counts": {},
    }
    if p.serving.exists():
        con = duckdb.connect(str(p.serving), read_only=True)
        try:
            out["row_counts"] = snapshot.table_row_counts(con)
            # Waiting: landing files the published manifest does not list. A path is known by
            # its part below a `landing/` folder too: a data directory that was moved or
            # restored elsewhere lists its files under their old absolute paths. A known path
            # whose file was replaced since (a producer's corrected re-send under the same
            # name) is waiting too: another size, or modified after its ingest and another
            # sha256 (only those few files are hashed, so a status stays cheap).
            if "raw.ingested_files" in out["row_counts"]:
                stored = con.execute(
                    "select path, bytes, sha256, epoch(finished_at) from raw.ingested_files"
                ).fetchall()
                records: dict[str, list] = {}
                for path, size, sha, done in stored:
                    rec = (size, sha, done)
                    records.setdefault(str(Path(path).resolve()), []).append(rec)
                    # (every position of '/landing/': a folder inside landing may be named so)
                    parts = path.split("/landing/")
                    for i in range(1, len(parts)):
                        records.setdefault("below:" + "/landing/".join(parts[i:]), []).append(rec)
                root = p.landing.resolve()

                def is_known(f: Path) -> bool:
                    full = f.resolve()
                    recs = records.get(str(full), [])
                    if full.is_relative_to(root):
                        recs = recs + records.get("below:" + full.relative_to(root).as_posix(), [])
                    if not recs:
                        return False
                    st = f.stat()
                    same_size = [r for r in recs if r[0] == st.st_size]
                    if not same_size:
                        return False
                    if st.st_mtime <= max(r[2] for r in recs):
                        return True
                    return file_sha256(f) in {r[1] for r in recs}

                waiting = 0
                for f in landing:
                    try:
                        waiting += not is_known(f)
                    except FileNotFoundError:  # gone since it was listed
                        continue
                out["landing_files_waiting"] = waiting
            out["snapshot"]["data_version"] = snapshot.data_version(con)
        finally:
            con.close()
    out["exports"] = _export_state(p.root / "exports" / "parquet",
                                   out["snapshot"].get("data_version"))
    # Failing checks come from the working warehouse: a blocking failure stops publish, so the
    # snapshot never hears of it. While a writer holds the warehouse, the snapshot answers.
    from quality.history import failing_checks_with_fallback

    failing, source = failing_checks_with_fallback(p.warehouse, p.serving)
    out["failing_checks_source"] = source
    out["failing_checks"] = [
        {k: (None if f.get(k) is None else str(f[k])) for k in _FAILING_FIELDS}
        for f in failing
    ]
    return out


def cmd_reject_file(args: argparse.Namespace) -> int:
    """Record the rejection of ingested files (alliance.rejections) in the working warehouse."""
    import duckdb

    from alliance.config import warehouse_config
    from alliance.rejections import RejectionError, reject_files
    from orchestration.resources import acquire_run_lock, release_run_lock, run_lock_path

    p = paths()
    if not p.warehouse.exists():
        print(f"error: no warehouse at {p.warehouse}", file=sys.stderr)
        return 2
    # A writer run holds the run lock from start to end and opens the warehouse step by step:
    # a rejection between two of its steps would change staging under its later steps.
    try:
        lock = acquire_run_lock(run_lock_path(p.warehouse), timeout_seconds=0)
    except RuntimeError as e:
        print(f"error: a writer run is in progress; retry when it is done ({e})", file=sys.stderr)
        return 2
    try:
        with duckdb.connect(str(p.warehouse), config=warehouse_config()) as con:
            done = reject_files(con, args.files, args.reason)
    except duckdb.IOException as e:
        from alliance.config import is_duckdb_lock_error

        if is_duckdb_lock_error(e):
            print(f"error: {p.warehouse} is in use by a running job; retry when it is done ({e})",
                  file=sys.stderr)
        else:
            print(f"error: cannot open the warehouse {p.warehouse}: {e}", file=sys.stderr)
        return 2
    except RejectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        release_run_lock(lock)
    if not done:
        print("nothing to do: the files were rejected before")
    for r in done:
        print(f"rejected file_id {r.file_id} ({r.file_name}, {r.events:,} events) as "
              f"{r.reason_code} at {r.rejected_at.isoformat(timespec='seconds')}")
    if done:
        _report_rejections(p, done)
        print("next: `alliance run` rebuilds every model without them and publishes; a corrected "
              "export can be dropped into landing/ as usual")
    return 0


def _report_rejections(p: DataPaths, done: list[Rejection]) -> None:
    """Record the rejections on the raw/rejected_files asset, so the UI shows when and which."""
    import dagster as dg

    from orchestration.instance import get_instance

    try:
        get_instance(p).report_runless_asset_event(dg.AssetMaterialization(
            asset_key=["raw", "rejected_files"],
            description="alliance reject-file",
            metadata={"file_ids": dg.MetadataValue.json([r.file_id for r in done]),
                      "reason_code": done[0].reason_code,
                      "events_left_out": sum(r.events for r in done)}))
    except Exception as e:  # noqa: BLE001 - the rejection itself is recorded in the warehouse
        print(f"warning: the rejection is recorded, but not shown in the Dagster UI: {e}",
              file=sys.stderr)


def _export_state(export_dir: Path, snapshot_version: str | None) -> dict[str, Any] | None:
    """The Parquet export's manifest summary, and whether it is of the current snapshot."""
    try:
        manifest = json.loads((export_dir / "_manifest.json").read_text())
    except (OSError, ValueError):
        return None
    version = (manifest.get("snapshot") or {}).get("data_version")
    return {"path": str(export_dir), "exported_at": manifest.get("exported_at"),
            "snapshot_data_version": version,
            "current": None if version is None or snapshot_version is None
            else version == snapshot_version}


def cmd_status(args: argparse.Namespace) -> int:
    st = collect_status(args.runs)
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return 0
    print(f"data directory: {st['data_dir']}")
    snap = st["snapshot"]
    print(f"serving snapshot: {snap['path']} (age {_fmt_age(snap['age_seconds'])}, "
          f"{len(snap['history'])} kept in history)")
    exp = st.get("exports")
    if exp:
        state = {True: "of the current snapshot", False: "of an older snapshot: the nightly run "
                 "(or `alliance run --select exports/parquet`) refreshes it",
                 None: "snapshot unknown"}[exp["current"]]
        print(f"Parquet export: {exp['path']} (exported {exp['exported_at']}, {state})")
    waiting = st.get("landing_files_waiting")
    print(f"files in landing/: {st['landing_files']}"
          + ("" if waiting is None else f", {waiting} not ingested as of the snapshot"))
    print("last runs:")
    if not st["runs"]:
        print("  (none yet)")
    for r in st["runs"]:
        extra = f"  file={r['landing_file']}" if r["landing_file"] else ""
        secs = f"{r['seconds']}s" if r["seconds"] is not None else "-"
        if r.get("process_gone"):
            extra += ("  (its process is gone: killed; the writer_run_reaper sensor or the next "
                      "writer run marks it failed)")
        print(f"  {r['run_id']}  {r['job']:<22} {r['status']:<10} {r['started'] or '-':<26}"
              f"{secs:>8}{extra}")
    if st["row_counts"]:
        print("row counts (serving snapshot):")
        for name, n in st["row_counts"].items():
            print(f"  {name:<45} {n:>12,}")
    print(f"failing checks: {len(st['failing_checks'])} (from {st['failing_checks_source']})")
    for f in st["failing_checks"]:
        # (GX checks count a row once per expectation it fails; SQL tests count rows)
        rows = (f"{f['unexpected_count']} failing" if f.get("unexpected_count") is not None
                else "error")
        print(f"  {f.get('severity', '')}: {f.get('asset', '')} {f.get('check_name', '')} "
              f"({rows}; failing since {f.get('failing_since') or '-'}, "
              f"last evaluated {f.get('evaluated_at', '')})")
    return 0


# Seconds `alliance dev` gives `dg dev` to shut down after a stop signal before killing it.
DEV_STOP_GRACE_SECONDS = 30


def _dg_bin() -> Path:
    """The dg next to this interpreter; marks its virtual environment as the active one (run
    from .venv/bin without activating it, dg warned that the environments differ)."""
    if sys.prefix != sys.base_prefix:
        os.environ["VIRTUAL_ENV"] = sys.prefix
    return Path(sys.executable).with_name("dg")


def cmd_dg(args: argparse.Namespace) -> int:
    """`dg <args>` on the platform's instance (DAGSTER_HOME=data/dagster); its exit code."""
    from orchestration.instance import use_instance_home

    use_instance_home()
    dg_bin = _dg_bin()
    extra = list(args.dg_args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(str(dg_bin), [str(dg_bin), *extra])
    return 0  # not reached


def cmd_dev(args: argparse.Namespace) -> int:
    """`dg dev` on the platform's instance, stoppable by SIGTERM as well as Ctrl-C.

    `dg dev` stops on SIGINT only, and a process started in the background of a non-interactive
    shell (a service manager, a container, `cmd &` in a script) inherits SIGINT ignored, so such a
    `dg dev` could only be killed, leaving its webserver and daemon behind. It runs as a child in
    its own process group with SIGINT restored; SIGTERM, SIGINT or SIGHUP here become a SIGINT
    there, and after DEV_STOP_GRACE_SECONDS the whole group is killed.
    """
    import signal
    import subprocess

    from orchestration.instance import use_instance_home

    home = use_instance_home()
    print(f"DAGSTER_HOME={home}", flush=True)
    dg_bin = _dg_bin()
    extra = [a for a in args.dg_args if a != "--"]

    def child_setup() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    children: list[subprocess.Popen] = []
    stopping: list[float] = []

    def interrupt_child() -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGINT)

    def stop(signum: int, _frame) -> None:  # noqa: ANN001
        if not stopping:
            print(f"alliance dev: {signal.Signals(signum).name}, stopping dg dev",
                  file=sys.stderr, flush=True)
            stopping.append(time.monotonic())
        interrupt_child()

    # Handlers first: a signal between the start of the child and the handlers would end this
    # process and leave the child, in a session of its own, running.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    children.append(subprocess.Popen([str(dg_bin), "dev", *extra], preexec_fn=child_setup,
                                      start_new_session=True))
    child = children[0]
    if stopping:
        interrupt_child()

    def exit_code(rc: int) -> int:
        return 128 - rc if rc < 0 else rc  # killed by signal n: 128 + n, as a shell reports it

    while True:
        try:
            return exit_code(child.wait(timeout=1))
        except subprocess.TimeoutExpired:
            if stopping and time.monotonic() - stopping[0] > DEV_STOP_GRACE_SECONDS:
                print("alliance dev: dg dev did not stop in time; killing its processes",
                      file=sys.stderr, flush=True)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                return exit_code(child.wait())
