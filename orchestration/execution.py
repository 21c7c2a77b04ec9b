"""Run the code location's jobs in-process on the persistent instance (CLI, demo and tests).

One path for every caller: the same jobs the sensors and schedules launch, on the same instance
(DAGSTER_HOME under the data directory), so CLI runs show in the UI and respect the pool limits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

from alliance.config import paths


def _defs():  # noqa: ANN202
    """The code location's definitions, rebuilt if the data directory changed since import."""
    from orchestration import definitions

    db = getattr(definitions.defs.resources.get("duckdb"), "database", None)
    if db == str(paths().warehouse):
        return definitions.defs
    return definitions.build_definitions()


def resolve_selection(select: str, defs: Any = None) -> tuple[set[Any], set[Any], set[Any]]:
    """(the asset keys `select` names, those plus the assets made in the same steps, the
    partitioned assets left out of both).

    An asset made by a step with others (the ingest writes raw/events, ingested_files and
    quarantine in one transaction) runs with all of them: Dagster cannot run part of such a step,
    and refused the run with a traceback. A bad or empty selection is a SystemExit naming it.
    """
    import dagster as dg

    graph = (defs or _defs()).resolve_asset_graph()
    try:
        with warnings.catch_warnings():
            # `group:` parses through a beta parameter of AssetSelection.groups: noise here
            warnings.simplefilter("ignore", dg.BetaWarning)
            selection = dg.AssetSelection.from_string(select)
            keys = selection.resolve(graph)
            whole = selection.required_multi_asset_neighbors().resolve(graph)
    except Exception as e:  # noqa: BLE001 - any selection error goes back to the user
        raise SystemExit(f"alliance run --select {select!r}: {e}") from e
    if not keys:
        raise SystemExit(f"alliance run --select {select!r} matches no asset")
    # A run of a selection has no partition: a partitioned asset in it (the clinic reports, by
    # clinic and month) failed the run after the models had been rebuilt and published, so
    # status showed a failure for data that had gone live. They are left out, and said so.
    partitioned = {k for k in whole if graph.get(k).is_partitioned}
    if partitioned and partitioned >= set(keys):
        raise SystemExit(
            f"alliance run --select {select!r} names only partitioned assets "
            f"({', '.join(sorted(k.to_user_string() for k in partitioned))}): run them per "
            "partition, e.g. alliance report --clinic C --month YYYY-MM, or alliance dg launch "
            "--assets reports/clinic_report --partition 'C|YYYY-MM'")
    return set(keys) - partitioned, set(whole) - partitioned, partitioned


def execute_job(
    job_name: str,
    *,
    select: str | None = None,
    run_config: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
    log=print,  # noqa: ANN001
    log_level: str = "INFO",
    partition_key: str | None = None,
) -> dict[str, Any]:
    """Execute one job of the code location in-process on the persistent instance."""

    from orchestration.instance import get_instance

    instance = get_instance()
    defs = _defs()
    # A free selection runs in the implicit asset job (the one the UI's "Materialize" uses).
    job = (defs.resolve_implicit_global_asset_job_def() if select
           else defs.resolve_job_def(job_name))
    asset_selection = None
    if select:
        keys, whole, left_out = resolve_selection(select, defs)
        if left_out:
            log("  left out (partitioned, run per partition: alliance report / alliance dg launch "
                "--partition): " + ", ".join(sorted(k.to_user_string() for k in left_out)))
        asset_selection = sorted(whole, key=lambda k: k.to_user_string())
        log(f"selected {len(asset_selection)} assets")
        if whole - keys:
            log("  with " + ", ".join(sorted(k.to_user_string() for k in whole - keys))
                + " (made in the same step as the selected ones)")
    # Step-level DEBUG events belong in the UI; the terminal gets INFO and up unless asked.
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}, **(run_config or {})}
    result = job.execute_in_process(
        run_config=run_config,
        instance=instance,
        tags={"alliance/trigger": "cli", **(tags or {})},
        asset_selection=asset_selection,
        partition_key=partition_key,
        raise_on_error=False,
    )
    failed_checks = [
        e.asset_check_evaluation_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        and not e.asset_check_evaluation_data.passed
    ]
    for ev in failed_checks:
        log(f"  check failed: {ev.asset_key.to_user_string()} {ev.check_name} "
            f"({ev.severity.value})")
    skipped = [e.step_key for e in result.all_events if e.event_type_value == "STEP_SKIPPED"]
    if skipped:
        log(f"  skipped (upstream failed or a blocking check failed): {', '.join(skipped[:8])}"
            + (" ..." if len(skipped) > 8 else ""))
    for line in failed_step_lines(result):
        log(line)
    label = f"selection {select}" if select else job_name
    log(f"run {result.run_id[:8]} ({label}) {'succeeded' if result.success else 'FAILED'}")
    return {"success": result.success, "run_id": result.run_id,
            "failed_checks": len(failed_checks), "skipped_steps": skipped,
            "failed_check_names": [f"{e.asset_key.to_user_string()}:{e.check_name}"
                                   for e in failed_checks]}




def failed_step_lines(result: Any) -> list[str]:
    """Each failed step's own error in one line (`  step <key> failed: <Class>: <message>`).

    Printed last by `execute_job`: Dagster's report of a failure carries the whole stack of its
    wrappers, and the line that says what to do (a lock holder, a missing file) got lost in it.
    """
    lines = []
    for e in result.all_events:
        if e.event_type_value == "STEP_FAILURE":
            err = e.step_failure_data.error
        elif e.event_type_value == "RESOURCE_INIT_FAILURE":  # (e.g. the writer-run lock's wait)
            err = e.event_specific_data.error
        else:
            continue
        while err is not None and err.cause is not None and err.cls_name in (
                "DagsterExecutionStepExecutionError", "DagsterUserCodeExecutionError",
                "DagsterResourceFunctionError"):
            err = err.cause
        text = (err.message if err is not None else "").strip().splitlines()
        lines.append(f"  step {e.step_key} failed: {text[0] if text else 'unknown error'}")
    return lines


def render_reports(
    clinic_months: Iterable[tuple[str, str]],
    *,
    min_cell: int | None = None,
    pdf: bool = False,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run reports_job for each (clinic, YYYY-MM) partition, as the monthly schedule does."""
    from orchestration.instance import get_instance
    from orchestration.partitions import add_clinic_partitions, report_partition_key

    add_clinic_partitions(get_instance(), paths().serving)
    config: dict[str, Any] = {"pdf": pdf}
    if min_cell is not None:
        config["min_cell"] = min_cell
    out = []
    for clinic, month in clinic_months:
        res = execute_job(
            "reports_job",
            partition_key=report_partition_key(clinic, month),
            run_config={"ops": {"reports__clinic_report": {"config": config}}},
            log=lambda m: None,
            log_level="WARNING",
        )
        log(f"report {clinic} {month}: {'ok' if res['success'] else 'FAILED'}")
        out.append({"clinic": clinic, "month": month, **res})
    return out


def latest_report_months(n_months: int = 3) -> list[tuple[str, str]]:
    """(clinic, month) for each clinic's last n months with attended sessions in the snapshot."""
    import duckdb

    with duckdb.connect(str(paths().serving), read_only=True) as con:
        rows = con.execute(
            """
            select clinic_id, strftime(session_month, '%Y-%m') as month
            from (
                select clinic_id, session_month,
                    row_number() over (partition by clinic_id order by session_month desc) as rn
                from (select distinct clinic_id, session_month from core.sessions
                      where status = 'attended')
            )
            where rn <= ? order by clinic_id, month
            """,
            [n_months],
        ).fetchall()
    return [(c, m) for c, m in rows]


def run_all(log: Callable[[str], None] = print, report_months: int = 3) -> dict[str, Any]:
    """Everything: the nightly rebuild job (ingest to publish), then recent clinic reports."""
    from orchestration.jobs import WRITER_TAG, nightly_rebuild_job

    out = execute_job(nightly_rebuild_job.name, tags={WRITER_TAG: "true"}, log=log)
    if out["success"] and report_months and paths().serving.exists():
        reports = render_reports(latest_report_months(report_months), log=log)
        out["reports"] = reports
        out["success"] = all(r["success"] for r in reports)
    return out
