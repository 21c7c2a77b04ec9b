"""Benchmark results: machine details, ratios against baselines and targets, JSON and Markdown."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

STAGES = ("ingest", "validation", "seeds", "sql_models", "publish", "exports",
          "reports", "orchestration")
# The targets (docs/benchmark.md).
TARGETS = {
    "ingest_over_floor_max": 3.0,
    "full_seconds_max_at_1e6": 120.0,
    "incremental_over_full_max": 0.15,
    "full_seconds_max_at_1e7": 1200.0,
    "peak_rss_mb_max_at_1e7": 8192.0,
    "ingest_peak_rss_mb_max_at_1e6": 2048.0,
}


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """Where the numbers were measured: CPUs, memory, versions, load average at this moment."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "cpu_model": _cpu_model(),
        "memory_gb": _memory_gb(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "duckdb": _version("duckdb"),
        "dagster": _version("dagster"),
        "great_expectations": _version("great-expectations"),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 3)


def ratios(run: dict[str, Any]) -> dict[str, Any]:
    """Ratios of one size's run against its baselines, and each target's verdict."""
    full = run.get("full") or {}
    st = full.get("stages", {})
    floor = (run.get("floor") or {}).get("seconds")
    plain = run.get("plain") or {}
    pst = plain.get("stages", {})
    gx = (run.get("gx") or {}).get("seconds")
    gx_load = (run.get("gx") or {}).get("load_seconds")
    inc = (run.get("incremental") or {}).get("seconds")
    events = run["events"]
    dag_core = sum(st.get(k, 0.0) for k in ("ingest", "seeds", "sql_models", "publish"))
    plain_core = sum(pst.get(k, 0.0) for k in ("ingest", "seeds", "sql_models", "model_tests",
                                               "publish")) if pst else None
    out: dict[str, Any] = {
        "ingest_over_floor": _ratio(st.get("ingest"), floor),
        # the same over the floor measured again after the pipeline (drift within the run)
        "ingest_over_floor_after": _ratio(st.get("ingest"), (run.get("floor_after") or {}).get("seconds")),
        "ingest_over_plain_ingest": _ratio(st.get("ingest"), pst.get("ingest")),
        "dagster_over_plain": _ratio(dag_core, plain_core),
        "validation_over_gx_alone": _ratio(st.get("validation"), gx),
        # The pipeline's validation step also reads the batch out of DuckDB into pandas.
        "validation_over_gx_with_load": _ratio(st.get("validation"),
                                               None if gx is None else gx + (gx_load or 0.0)),
        "incremental_over_full": _ratio(inc, full.get("seconds")),
        "full_events_per_second": round(events / full["seconds"]) if full.get("seconds") else None,
    }
    # Interleaved rounds: each Dagster ingest step over the floor run just before it.
    pairs = [_ratio((r.get("ingest_step") or {}).get("seconds"), (r.get("floor") or {}).get("seconds"))
             for r in run.get("rounds") or []
             if (r.get("ingest_step") or {}).get("success") and "error" not in (r.get("floor") or {})]
    pairs = [x for x in pairs if x]
    out["ingest_over_floor_rounds"] = pairs
    out["ingest_over_floor_median"] = round(statistics.median(pairs), 3) if pairs else None
    # The verdict: the median of the rounds when they ran, else the pipeline's single pair.
    verdict = out["ingest_over_floor_median"] if pairs else out["ingest_over_floor"]
    peak = max((r.get("rss_mb", {}).get("peak", 0.0) for r in (full, run.get("incremental") or {})),
               default=0.0)
    targets: dict[str, dict[str, Any]] = {
        "ingest_at_most_3x_floor": {
            "value": verdict, "limit": TARGETS["ingest_over_floor_max"],
            "met": _met(verdict, TARGETS["ingest_over_floor_max"]),
            "basis": f"median of {len(pairs)} interleaved rounds" if pairs
            else "the pipeline's ingest step over the first floor"},
        "incremental_at_most_15pct": {
            "value": out["incremental_over_full"], "limit": TARGETS["incremental_over_full_max"],
            "met": _met(out["incremental_over_full"], TARGETS["incremental_over_full_max"])},
    }
    # The time targets are stated for a size; smaller runs are not judged against them.
    if events >= 1_000_000 and events < 10_000_000:
        targets["full_at_most_120s_at_1e6"] = {
            "value": full.get("seconds"), "limit": TARGETS["full_seconds_max_at_1e6"],
            "met": _met(full.get("seconds"), TARGETS["full_seconds_max_at_1e6"])}
        ingest_peak = plain.get("ingest_peak_rss_mb")
        if ingest_peak is not None:  # (the plain scenario was run)
            targets["ingest_peak_rss_under_2gb_at_1e6"] = {
                "value": ingest_peak, "limit": TARGETS["ingest_peak_rss_mb_max_at_1e6"],
                "met": _met(ingest_peak, TARGETS["ingest_peak_rss_mb_max_at_1e6"])}
    if events >= 10_000_000:
        targets["full_at_most_20min_at_1e7"] = {
            "value": full.get("seconds"), "limit": TARGETS["full_seconds_max_at_1e7"],
            "met": _met(full.get("seconds"), TARGETS["full_seconds_max_at_1e7"])}
        targets["peak_rss_at_most_8gb_at_1e7"] = {
            "value": peak, "limit": TARGETS["peak_rss_mb_max_at_1e7"],
            "met": _met(peak, TARGETS["peak_rss_mb_max_at_1e7"])}
    out["peak_rss_mb"] = peak
    out["targets"] = targets
    return out


def _met(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def _s(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.2f}"


def _x(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _load(values: list[float] | None) -> str:
    return "not recorded" if not values else " / ".join(map(str, values))


def _rounds_rows(run: dict[str, Any], r: dict[str, Any]) -> list[str]:
    """Table rows of the interleaved (floor, Dagster ingest step) rounds and their median."""
    rounds = run.get("rounds") or []
    if not rounds:
        return []
    rows = []
    for i, rd in enumerate(rounds, 1):
        fl, ing = rd.get("floor") or {}, rd.get("ingest_step") or {}
        ratio = _ratio(ing.get("seconds"), fl.get("seconds")) if ing.get("success") else None
        rows.append(f"| ingest, round {i} (Dagster ingest step alone; the floor just before it) "
                    f"| {_s(ing.get('seconds') if ing.get('success') else None)} | | "
                    f"{_s(fl.get('seconds'))} | {_x(ratio)} of it |")
    rows.append(f"| **ingest, median of the {len(rounds)} rounds (the target's verdict)** | | | | "
                f"**{_x(r.get('ingest_over_floor_median'))}** |")
    return rows


def _source(doc: dict[str, Any]) -> str:
    src = doc.get("source") or {}
    n = src.get("modified_files")
    changed = "modified files not recorded" if n is None else f"{n} modified tracked files"
    return f"Code: commit {src.get('commit') or 'unknown'} ({changed})."


def markdown(doc: dict[str, Any]) -> str:
    """The results as a Markdown report (one section per size)."""
    m = doc["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Measured {m['measured_at']} on {m['cpu_count']} CPUs ({m['cpus_usable']} usable), "
        f"{m['cpu_model']}, {m['memory_gb']} GB RAM; load average at start "
        f"{' / '.join(map(str, m['load_average']))} (1 / 5 / 15 min). Python {m['python']}, "
        f"DuckDB {m['duckdb']}, Dagster {m['dagster']}, Great Expectations "
        f"{m['great_expectations']}. Command: `{doc['command']}`. {_source(doc)}",
        "",
        "Stages are Dagster step durations of what `alliance run` runs: the nightly rebuild job "
        "(every asset but the reports, with all checks), then one report run per clinic and month "
        "(each clinic's latest 3 months); `orchestration` is the rebuild run's wall time not spent "
        "inside any step. Baselines ran in the same invocation on the same files, each "
        "in its own process. Timings on a shared machine vary; read ratios, not single numbers.",
        "",
    ]
    for run in doc["runs"]:
        r = run.get("ratios", {})
        full = run.get("full") or {}
        st = full.get("stages", {})
        plain = (run.get("plain") or {}).get("stages", {})
        lines += [
            f"## {run['events']:,} events ({run['dataset']['summary']['lines']:,} lines in "
            f"{run['dataset']['summary']['files']} files"
            f"{'' if full.get('success') else '; RUN FAILED'})",
            "",
            f"Load average at the start of this size {_load(run.get('load_average_at_start'))}, "
            f"at its end {_load(run.get('load_average_at_end'))}.",
            "",
            "| stage | Dagster pipeline (s) | plain script (s) | baseline (s) | ratio |",
            "|---|---:|---:|---:|---:|",
            f"| ingest | {_s(st.get('ingest'))} | {_s(plain.get('ingest'))} | "
            f"{_s((run.get('floor') or {}).get('seconds'))} (read_json floor) | "
            f"{_x(r.get('ingest_over_floor'))} of floor |",
            f"| (the floor again, after the pipeline: the machine's drift) | | | "
            f"{_s((run.get('floor_after') or {}).get('seconds'))} | "
            f"{_x(r.get('ingest_over_floor_after'))} of it |",
            *_rounds_rows(run, r),
            f"| validation (GX batch suite + line identity) | {_s(st.get('validation'))} | | "
            f"{_s((run.get('gx') or {}).get('seconds'))} (GX alone; + "
            f"{_s((run.get('gx') or {}).get('load_seconds'))} reading the batch into pandas) | "
            f"{_x(r.get('validation_over_gx_alone'))} of GX alone, "
            f"{_x(r.get('validation_over_gx_with_load'))} of GX + read |",
            f"| seeds | {_s(st.get('seeds'))} | {_s(plain.get('seeds'))} | | |",
            f"| SQL models (+ their SQL tests and the quality checks on models; plain: models + tests) | {_s(st.get('sql_models'))} | "
            f"{_s((plain.get('sql_models') or 0) + (plain.get('model_tests') or 0) if plain else None)}"
            " | | |",
            f"| publish (serving snapshot) | {_s(st.get('publish'))} | {_s(plain.get('publish'))} | | |",
            f"| exports | {_s(st.get('exports'))} | | | |",
            f"| reports ({len(full.get('reports', []))} clinic reports) | {_s(st.get('reports'))} "
            "| | | |",
            f"| orchestration (run time outside steps) | {_s(st.get('orchestration'))} | | | |",
            f"| loading definitions | {_s(full.get('load_seconds'))} | | | |",
            f"| **whole run** | **{_s(full.get('seconds'))}** | "
            f"{_s((run.get('plain') or {}).get('seconds'))} (ingest..publish) | | "
            f"Dagster/plain on ingest+seeds+models+publish: {_x(r.get('dagster_over_plain'))} |",
            f"| incremental (+1% events, one file) | "
            f"{_s((run.get('incremental') or {}).get('seconds'))} | | | "
            f"{_s(None if r.get('incremental_over_full') is None else 100 * r['incremental_over_full'])}"
            "% of full |",
            "",
            f"Peak RSS (MB): pipeline {_s((full.get('rss_mb') or {}).get('peak'))}, incremental "
            f"{_s(((run.get('incremental') or {}).get('rss_mb') or {}).get('peak'))}, floor "
            f"{_s(((run.get('floor') or {}).get('rss_mb') or {}).get('peak'))}, plain "
            f"{_s(((run.get('plain') or {}).get('rss_mb') or {}).get('peak'))} (its ingest "
            f"{_s((run.get('plain') or {}).get('ingest_peak_rss_mb'))}), GX alone "
            f"{_s(((run.get('gx') or {}).get('rss_mb') or {}).get('peak'))}. "
            f"Throughput {r.get('full_events_per_second') or 'n/a'} events/s end to end.",
            "",
            "| target | value | limit | met |",
            "|---|---:|---:|---|",
        ]
        for name, t in r.get("targets", {}).items():
            met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
            basis = f" ({t['basis']})" if t.get("basis") else ""
            lines.append(f"| {name}{basis} | {_s(t['value'])} | {_s(t['limit'])} | {met} |")
        if full.get("failed_checks"):
            lines += ["", "Failed checks in the full run: " + ", ".join(full["failed_checks"])]
        lines.append("")
    return "\n".join(lines) + "\n"
