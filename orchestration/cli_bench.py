"""`alliance bench`: time the real Dagster pipeline against same-run baselines (docs/benchmark.md).

Also the worker for the Dagster scenario: `python -m orchestration.cli_bench pipeline SPEC OUT`
runs, in its own process (so its peak RSS is its own), one full materialisation of every
unpartitioned asset with its checks, exactly as `alliance run` does, then the clinic reports of
the latest month, and reports per-stage seconds from Dagster's step statistics.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

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
        "GX alone and a 1%% incremental run; write JSON and Markdown to --out.",
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
    p.add_argument("--skip", default="", metavar="NAME,NAME",
                   help="skip scenarios (floor, plain, gx, incremental), e.g. for a quick look")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark for each size and write the results."""
    from alliance.bench import run_bench

    sizes = args.sizes or [args.events]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    doc = run_bench(sizes, Path(args.out), seed=args.seed, months=args.months,
                    data_docs=args.data_docs, skip=skip)
    return 0 if all(r.get("ok") for r in doc["runs"]) else 1


# ---------------------------------------------------------------- worker side (own process)


def _stage_of_steps(defs: Any) -> dict[str, str]:
    """Step key (node name) -> benchmark stage for every asset and check node."""
    graph = defs.resolve_asset_graph()
    out: dict[str, str] = {}
    for a in defs.assets or []:
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


def _report_month(serving: Path) -> str | None:
    """The last month with sessions in the snapshot, within the month partitions."""
    import duckdb

    from orchestration.partitions import month_partitions

    with duckdb.connect(str(serving), read_only=True) as con:
        month = con.execute("select strftime(max(session_month), '%Y-%m') from core.sessions").fetchone()[0]
    keys = month_partitions.get_partition_keys()
    if not month or not keys:
        return None
    return min(month, keys[-1])


def pipeline(spec: dict[str, Any]) -> dict[str, Any]:
    """One Dagster run of every unpartitioned asset and check (as `alliance run`), then reports."""
    t0 = time.perf_counter()
    import dagster as dg

    from alliance.config import paths
    from assets.reports import clinic_report
    from orchestration.definitions import build_definitions
    from orchestration.execution import unpartitioned_selection
    from orchestration.instance import get_instance
    from orchestration.jobs import ingest_run_config
    from orchestration.partitions import add_clinic_partitions, report_partition_key
    from orchestration.resources import AllianceSettings

    p = paths().ensure()
    defs = build_definitions()
    instance = get_instance()
    stage_of = _stage_of_steps(defs)
    load_s = time.perf_counter() - t0

    t = time.perf_counter()
    result = dg.materialize(
        [*(defs.assets or []), *(defs.asset_checks or [])],
        selection=unpartitioned_selection(defs),
        instance=instance,
        resources=defs.resources,
        run_config=ingest_run_config(spec["files"]),
        tags={"alliance/trigger": "bench"},
        raise_on_error=False,
    )
    run_s = time.perf_counter() - t
    steps = _step_seconds(instance, result.run_id)
    failed_checks = sorted(
        f"{e.asset_check_evaluation_data.asset_key.to_user_string()}:{e.asset_check_evaluation_data.check_name}"
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION" and not e.asset_check_evaluation_data.passed
    )
    stages: dict[str, float] = {}
    for key, sec in steps.items():
        stage = stage_of.get(key, "other")
        stages[stage] = stages.get(stage, 0.0) + sec
    stages["orchestration"] = max(0.0, run_s - sum(steps.values()))

    # Reports: one Dagster run per clinic partition of the latest month, as the schedule launches.
    t = time.perf_counter()
    reports: list[str] = []
    month = _report_month(p.serving) if result.success and p.serving.exists() else None
    if month:
        add_clinic_partitions(instance, p.serving)
        from orchestration.partitions import clinics_in_serving

        for clinic in clinics_in_serving(p.serving):
            r = dg.materialize([clinic_report], partition_key=report_partition_key(clinic, month),
                               instance=instance, resources={"settings": AllianceSettings()},
                               selection=[clinic_report], raise_on_error=False)
            if r.success:
                reports.append(f"{clinic}|{month}")
    stages["reports"] = time.perf_counter() - t
    events = 0
    if p.warehouse.exists():
        import duckdb

        with duckdb.connect(str(p.warehouse), read_only=True) as con:
            events = con.execute("select count(*) from raw.events").fetchone()[0]
    return {
        "success": bool(result.success), "run_id": result.run_id, "failed_checks": failed_checks,
        "load_seconds": load_s, "run_seconds": run_s, "stages": stages,
        "steps": {k: round(v, 3) for k, v in sorted(steps.items())}, "reports": reports,
        "events_in_log": int(events),
        "seconds": load_s + run_s + stages["reports"],
    }


if __name__ == "__main__":
    from alliance.bench.stages import worker_main

    sys.exit(worker_main({"pipeline": pipeline}))
