"""Benchmark scenarios that run in their own process: the baselines, and the worker protocol.

Every scenario runs in a fresh Python process so that its peak RSS (getrusage of the process and
its children) belongs to that scenario alone. Protocol:
`python -m <module> <scenario> <spec.json> <result.json>`; the module maps scenario names to
functions `f(spec) -> dict`, and `worker_main` adds wall time and peak RSS to the result.

Baselines (no Dagster import anywhere in this module):
- `floor`: DuckDB's bare `create table ... as select * from read_json([...])` into a DuckDB file
  on the same disk as the warehouse: the engine's floor for ingestion.
- `plain`: the platform's own ingest, seeds, SQL models (+ their tests) and publish, called from a
  plain script: what the pipeline costs without orchestration.
- `gx`: the Great Expectations batch suite on the whole batch alone (data already loaded).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Scenario = Callable[[dict[str, Any]], dict[str, Any]]

FLOOR_SQL = ("create table t as select * from read_json({files}, "
             "format = 'newline_delimited', ignore_errors = true)")


def peak_rss_mb() -> dict[str, float]:
    """Peak resident set size so far of this process and of its waited-for children, in MB."""
    # ru_maxrss is in KiB on Linux.
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"self": round(own, 1), "children": round(kids, 1), "peak": round(max(own, kids), 1)}


def fresh_dir(path: Path) -> Path:
    """Empty `path` (a benchmark scratch folder) and return it."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _sql_list(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def floor(spec: dict[str, Any]) -> dict[str, Any]:
    """Baseline (a): bare read_json into a DuckDB file; the ingest floor."""
    import duckdb

    work = fresh_dir(Path(spec["work_dir"]))
    db = work / "floor.duckdb"
    sql = FLOOR_SQL.format(files=_sql_list(spec["files"]))
    con = duckdb.connect(str(db))
    t0 = time.perf_counter()
    con.execute(sql)
    con.execute("checkpoint")  # the warehouse's ingest commits to disk too
    seconds = time.perf_counter() - t0
    rows = con.execute("select count(*) from t").fetchone()[0]
    con.close()
    return {"seconds": seconds, "rows": int(rows), "db_bytes": db.stat().st_size,
            "sql": FLOOR_SQL.format(files="[<files>]")}


def plain(spec: dict[str, Any]) -> dict[str, Any]:
    """Baseline (b): ingest, seeds, models, model tests and publish without Dagster."""
    import duckdb

    from alliance import snapshot, sqlrunner
    from alliance.config import SQL_DIR, paths, warehouse_config
    from alliance.ingest import ingest_files
    from alliance.instruments import load_instruments, write_parameters_table, write_seed_tables
    from alliance.pseudonyms import load_key

    p = paths(fresh_dir(Path(spec["work_dir"]))).ensure()
    key = load_key(p.secrets / "demo_pseudonym_key")
    stages: dict[str, float] = {}
    out: dict[str, Any] = {"stages": stages}
    con = duckdb.connect(str(p.warehouse), config=warehouse_config())
    t = time.perf_counter()
    results = ingest_files(con, [Path(f) for f in spec["files"]], key, quarantine_dir=p.quarantine)
    # Written to disk, as the floor is: without this the checkpoint (which merges the partly
    # filled row groups of the log, about a second per million events) lands in a later stage.
    # The Dagster step pays it when its connection closes.
    con.execute("checkpoint")
    stages["ingest"] = time.perf_counter() - t
    # The process's peak so far is the ingest's own (nothing but imports ran before it): the
    # issue's memory target is on the ingest, which the pipeline's peak (GX, models) hides.
    out["ingest_peak_rss_mb"] = peak_rss_mb()["self"]
    out["accepted"] = sum(r.accepted for r in results)
    out["quarantined"] = sum(r.quarantined for r in results)
    t = time.perf_counter()
    write_seed_tables(con, load_instruments())
    write_parameters_table(con, SQL_DIR / "parameters.yml")
    stages["seeds"] = time.perf_counter() - t
    t = time.perf_counter()
    built = sqlrunner.run_models(con)
    stages["sql_models"] = time.perf_counter() - t
    t = time.perf_counter()
    models = sqlrunner.discover_models()
    failing = 0
    for b in built:
        failing += sum(not r.passed for r in sqlrunner.run_tests(con, models[b.model.fqn]))
    stages["model_tests"] = time.perf_counter() - t
    out["models"] = len(built)
    out["failing_tests"] = failing
    t = time.perf_counter()
    snapshot.publish_from_connection(con, p.warehouse, p.serving)
    stages["publish"] = time.perf_counter() - t
    con.close()
    out["seconds"] = sum(stages.values())
    return out


def gx(spec: dict[str, Any]) -> dict[str, Any]:
    """Baseline (c): the GX batch suite on every event of a warehouse (read-only), nothing else."""
    import duckdb

    from quality.batch import load_batch, validate_batch

    t = time.perf_counter()
    import great_expectations  # noqa: F401  (timed apart: the pipeline pays it once per process)

    import_s = time.perf_counter() - t
    with duckdb.connect(spec["warehouse"], read_only=True) as con:
        ids = [r[0] for r in con.execute("select file_id from raw.ingested_files").fetchall()]
        t = time.perf_counter()
        batch = load_batch(con, ids)
        load_s = time.perf_counter() - t
    validation = validate_batch(batch.events, batch.answers, batch.items,
                                instruments=batch.instruments, file_ids=ids)
    return {"seconds": validation.seconds, "load_seconds": load_s, "import_seconds": import_s,
            "rows": validation.rows, "passed": validation.passed,
            "answers": 0 if batch.answers is None else len(batch.answers)}


SCENARIOS: dict[str, Scenario] = {"floor": floor, "plain": plain, "gx": gx}


def worker_main(scenarios: dict[str, Scenario], argv: list[str] | None = None) -> int:
    """Run one scenario named on the command line; write its result with wall time and peak RSS."""
    argv = sys.argv[1:] if argv is None else argv
    name, spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    os.environ.update(spec.get("env", {}))
    t0 = time.perf_counter()
    result = scenarios[name](spec)
    result["wall_seconds"] = time.perf_counter() - t0
    result["rss_mb"] = peak_rss_mb()
    Path(result_path).write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(SCENARIOS))
