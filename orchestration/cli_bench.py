"""`alliance bench`: time the real Dagster pipeline against same-run baselines (docs/benchmark.md).

Also the worker for the Dagster scenario: `python -m orchestration.cli_bench pipeline SPEC OUT`
runs, in its own process (so its peak RSS is its own), exactly what `alliance run` runs: the
nightly rebuild job (every asset but the reports, with all checks), then each clinic's reports of
its latest 3 months; per-stage seconds come from Dagster's step statistics.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_ROUNDS = 5  # alliance.bench.DEFAULT_ROUNDS (not imported: keeps the CLI import light)

# Stage of each step, from the group of the asset it materialises (checks: their target's group).
GROUP_STAGE = {
    "ingest": "ingest", "seeds": "seeds", "staging": "sql_models", "core": "sql_models",
    "marts": "sql_models", "publish": "publish", "exports": "exports", "reports": "reports",
}


def _sizes(text: str) -> list[int]:
    try:
        return [int(float(s)) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--sizes must be numbers like 1e5,1e6, got {text!r}") from e


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `bench` subcommand."""
    p = sub.add_parser(
        "bench",
        help="benchmark the pipeline (speed, peak RSS, incremental) against same-run baselines",
        description="Simulate (or reuse) data sets under <data>/bench/<n>/, then time every stage of "
        "the real Dagster pipeline, a bare DuckDB read_json floor, the same models without Dagster, "
        "GX alone and a 1% incremental run; write JSON and Markdown to --out.",
    )
    p.add_argument("--events", type=lambda s: int(float(s)), default=1_000_000, metavar="N",
                   help="data set size in valid events (default 1e6)")
    p.add_argument("--sizes", type=_sizes, default=None, metavar="N,N",
                   help="several sizes, e.g. 1e5,1e6 (overrides --events)")
    p.add_argument("--out", default="bench/results", help="folder for results (default bench/results)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--months", type=int, default=18,
                   help="simulated window in months (one export file per day; default 18)")
    p.add_argument("--data-docs", action="store_true",
                   help="also build GX Data Docs during validation (off by default, as in operations "
                        "where $ALLIANCE_QUALITY_DOCS=0)")
    p.add_argument("--profile", action="store_true",
                   help="also time every ingest statement, model build and model test "
                        "(writes profile-<size>.md)")
    p.add_argument("--skip", default="", metavar="NAME,NAME",
                   help="skip scenarios (floor, plain, gx, incremental, rounds), e.g. for a quick "
                        "look")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, metavar="N",
                   help="interleaved rounds of (floor, Dagster ingest step) the ingest target is "
                        f"judged on, by their median ratio (default {DEFAULT_ROUNDS}; 0: none)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark for each size and write the results."""
    from alliance.bench import run_bench

    sizes = args.sizes or [args.events]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.rounds < 0:
        print("alliance bench: --rounds must be 0 or more", file=sys.stderr)
        return 2
    doc = run_bench(sizes, Path(args.out), seed=args.seed, months=args.months,
                    data_docs=args.data_docs, skip=skip, profile=args.profile, rounds=args.rounds)
    return 0 if all(r.get("ok") for r in doc["runs"]) else 1


# ---------------------------------------------------------------- worker side (own process)


def _stage_of_steps(defs: Any) -> dict[str, str]:
    """Step key (node name) -> benchmark stage for every asset and check node."""
    import dagster as dg

    graph = defs.resolve_asset_graph()
    out: dict[str, str] = {}
    for a in defs.assets or []:
        if not isinstance(a, dg.AssetsDefinition) or not a.is_executable:
            continue  # external assets (raw/rejected_files) have no step
        groups = {graph.get(k).group_name for k in a.keys}
        out[a.node_def.name] = GROUP_STAGE.get(sorted(groups)[0], "other")
    for c in defs.asset_checks or []:
        targets = {graph.get(k.asset_key).group_name for k in c.check_keys}
        # Contract checks on the ingested batch are "validation"; checks on models come later.
        out[c.node_def.name] = "validation" if targets == {"ingest"} else "model_checks"
    return out


def _step_seconds(instance: Any, run_id: str) -> dict[str, float]:
    stats = instance.get_run_step_stats(run_id)
    return {s.step_key: (s.end_time or 0) - (s.start_time or 0) for s in stats if s.start_time}


def pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """`alliance run` on the given files: the nightly rebuild job, then recent clinic reports.

    Uses the same calls as `alliance run` (orchestration/execution.py): `execute_job` of
    nightly_rebuild_job (every asset except reports, with all checks) with the ingest reading
    exactly `spec["files"]`, then `render_reports` for each clinic's latest months.
    """
    t0 = time.perf_counter()
    from alliance.config import paths
    from orchestration import execution
    from orchestration.instance import get_instance
    from orchestration.jobs import WRITER_TAG, ingest_run_config, nightly_rebuild_job

    p = paths().ensure()
    defs = execution._defs()
    instance = get_instance()
    stage_of = _stage_of_steps(defs)
    load_s = time.perf_counter() - t0

    t = time.perf_counter()
    # The full run is nightly_rebuild_job; the incremental scenario passes "ingest_job", the job
    # the landing sensor launches for one new file (orchestration/sensors.py).
    job_name = spec.get("job", nightly_rebuild_job.name)
    out = execution.execute_job(job_name, run_config=ingest_run_config(spec["files"]),
                                tags={WRITER_TAG: "true", "alliance/trigger": "bench"},
                                log=lambda m: print(m, flush=True))
    run_s = time.perf_counter() - t
    steps = _step_seconds(instance, out["run_id"])
    failed_checks = sorted(
        f"{ev.dagster_event.asset_check_evaluation_data.asset_key.to_user_string()}:"
        f"{ev.dagster_event.asset_check_evaluation_data.check_name}"
        for ev in instance.all_logs(out["run_id"])
        if ev.dagster_event is not None
        and ev.dagster_event.event_type_value == "ASSET_CHECK_EVALUATION"
        and not ev.dagster_event.asset_check_evaluation_data.passed
    )
    stages: dict[str, float] = {}
    for key, sec in steps.items():
        stage = stage_of.get(key, "other")
        stages[stage] = stages.get(stage, 0.0) + sec
    stages["orchestration"] = max(0.0, run_s - sum(steps.values()))

    # Reports: one Dagster run per clinic x month partition, as `alliance run` renders them.
    t = time.perf_counter()
    reports: list[dict[str, Any]] = []
    if out["success"] and p.serving.exists() and spec.get("report_months", 3) > 0:
        months = execution.latest_report_months(spec.get("report_months", 3))
        reports = execution.render_reports(months, log=lambda m: print(m, flush=True))
    stages["reports"] = time.perf_counter() - t
    events = 0
    if p.warehouse.exists():
        import duckdb

        with duckdb.connect(str(p.warehouse), read_only=True) as con:
            events = con.execute("select count(*) from raw.events").fetchone()[0]
    return {
        "success": bool(out["success"]) and all(r["success"] for r in reports),
        "job": job_name, "run_id": out["run_id"], "failed_checks": failed_checks,
        "skipped_steps": out.get("skipped_steps", []),
        "load_seconds": load_s, "run_seconds": run_s, "stages": stages,
        "steps": {k: round(v, 3) for k, v in sorted(steps.items())},
        "reports": [f"{r['clinic']}|{r['month']}" for r in reports if r["success"]],
        "events_in_log": int(events),
        "seconds": load_s + run_s + stages["reports"],
    }


def ingest_step(spec: dict[str, Any]) -> dict[str, Any]:
    """The ingest step alone, as Dagster runs it: the ingest assets (and their checks) selected
    in one run on a fresh data directory, reading exactly `spec["files"]`; `seconds` is the
    ingest step's own duration (the same measure as the pipeline's ingest stage)."""
    from alliance.config import paths
    from orchestration import execution
    from orchestration.instance import get_instance
    from orchestration.jobs import WRITER_TAG, ingest_run_config

    paths().ensure()
    out = execution.execute_job("ingest", select="group:ingest",
                                run_config=ingest_run_config(spec["files"]),
                                tags={WRITER_TAG: "true", "alliance/trigger": "bench"},
                                log=lambda m: print(m, flush=True))
    steps = _step_seconds(get_instance(), out["run_id"])
    return {"success": bool(out["success"]), "run_id": out["run_id"],
            "seconds": steps.get("ingest", 0.0), "steps": {k: round(v, 3) for k, v in steps.items()}}


if __name__ == "__main__":
    from alliance.bench.stages import worker_main

    sys.exit(worker_main({"pipeline": pipeline, "ingest_step": ingest_step}))
