"""Where the time goes: per-statement ingest timings and per-model build and test timings.

`python -m alliance.bench.profile profile SPEC OUT` (or `alliance bench --profile`) ingests the
data set into a scratch warehouse through a connection wrapper that times every statement
`alliance.ingest` sends, times the Python parts of the ingest (file reading, pseudonyms), then
builds every SQL model and runs each model test on its own. Nothing in alliance/ingest.py is
changed: the wrapper only observes.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from alliance.bench.stages import fresh_dir, worker_main


def _label(sql: str) -> str:
    """A readable key for a statement: its first 90 characters, whitespace collapsed."""
    text = re.sub(r"\s+", " ", sql).strip()
    return text[:90]


class TimedConnection:
    """A DuckDB connection stand-in that records how long each `execute` took."""

    def __init__(self, con: Any) -> None:
        self._con = con
        self.timings: list[tuple[str, float]] = []

    def execute(self, sql: str, params: Any = None) -> Any:
        t = time.perf_counter()
        r = self._con.execute(sql) if params is None else self._con.execute(sql, params)
        self.timings.append((_label(sql), time.perf_counter() - t))
        return r

    def __getattr__(self, name: str) -> Any:
        return getattr(self._con, name)


def _timed(fn: Callable[..., Any], sink: dict[str, list[float]], name: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.setdefault(name, []).append(time.perf_counter() - t)

    return wrapper


def _summarise(rows: list[tuple[str, float]], top: int = 25) -> list[dict[str, Any]]:
    agg: dict[str, list[float]] = {}
    for label, sec in rows:
        agg.setdefault(label, []).append(sec)
    out = [{"statement": k, "calls": len(v), "seconds": round(sum(v), 3)} for k, v in agg.items()]
    return sorted(out, key=lambda r: -r["seconds"])[:top]


def profile(spec: dict[str, Any]) -> dict[str, Any]:
    """Ingest with per-statement timings, then per-model build and test timings."""
    import duckdb

    from alliance import ingest as ingest_mod
    from alliance import sqlrunner
    from alliance.config import SQL_DIR, paths, warehouse_config
    from alliance.instruments import load_instruments, write_parameters_table, write_seed_tables
    from alliance.pseudonyms import load_key

    p = paths(fresh_dir(Path(spec["work_dir"]))).ensure()
    key = load_key(p.secrets / "demo_pseudonym_key")
    python_parts: dict[str, list[float]] = {}
    # Observe the Python-side helpers the ingest calls by module attribute lookup.
    for name in ("_read_file", "file_sha256", "_pseudonym_table", "_register_instruments",
                 "load_contract"):
        setattr(ingest_mod, name, _timed(getattr(ingest_mod, name), python_parts, name))
    con = duckdb.connect(str(p.warehouse), config=warehouse_config())
    timed = TimedConnection(con)
    t = time.perf_counter()
    ingest_mod.ingest_files(timed, [Path(f) for f in spec["files"]], key,  # type: ignore[arg-type]
                            quarantine_dir=p.quarantine)
    ingest_s = time.perf_counter() - t
    sql_s = sum(s for _, s in timed.timings)
    write_seed_tables(con, load_instruments())
    write_parameters_table(con, SQL_DIR / "parameters.yml")
    models = sqlrunner.discover_models()
    builds, tests = [], []
    for fqn in sqlrunner.topological_order(models):
        b = sqlrunner.build_model(con, models[fqn])
        builds.append({"model": fqn, "seconds": round(b.seconds, 3), "rows": b.row_count})
        for test in models[fqn].tests:
            t = time.perf_counter()
            sqlrunner.run_tests(con, models[fqn], [test.check_name])
            tests.append({"model": fqn, "test": test.check_name,
                          "seconds": round(time.perf_counter() - t, 3)})
    con.close()
    return {
        "seconds": ingest_s,
        "ingest": {
            "seconds": round(ingest_s, 3), "sql_seconds": round(sql_s, 3),
            "python": {k: {"calls": len(v), "seconds": round(sum(v), 3)}
                       for k, v in python_parts.items()},
            "statements": _summarise(timed.timings),
        },
        "models": sorted(builds, key=lambda r: -r["seconds"]),
        "model_seconds": round(sum(b["seconds"] for b in builds), 3),
        "tests": sorted(tests, key=lambda r: -r["seconds"])[:25],
        "test_seconds": round(sum(t["seconds"] for t in tests), 3),
        "tests_count": len(tests),
    }


def markdown(result: dict[str, Any]) -> str:
    """The profile as Markdown tables."""
    ing = result["ingest"]
    lines = ["# Ingest and model profile", "",
             f"Ingest {ing['seconds']:.2f} s, of which {ing['sql_seconds']:.2f} s in DuckDB "
             "statements (Python parts below include the statements they issue).", "",
             "| Python part | calls | seconds |", "|---|---:|---:|"]
    for k, v in sorted(ing["python"].items(), key=lambda kv: -kv[1]["seconds"]):
        lines.append(f"| `{k}` | {v['calls']} | {v['seconds']:.2f} |")
    lines += ["", "| statement (first 90 characters) | calls | seconds |", "|---|---:|---:|"]
    for r in ing["statements"]:
        lines.append(f"| `{r['statement'].replace('|', '/')}` | {r['calls']} | {r['seconds']:.2f} |")
    lines += ["", f"SQL models: {result['model_seconds']:.2f} s to build; "
              f"{result['tests_count']} model tests: {result['test_seconds']:.2f} s.", "",
              "| model | rows | build seconds |", "|---|---:|---:|"]
    for b in result["models"][:12]:
        lines.append(f"| {b['model']} | {b['rows']:,} | {b['seconds']:.2f} |")
    lines += ["", "| slowest tests | seconds |", "|---|---:|"]
    for t in result["tests"][:12]:
        lines.append(f"| {t['model']}: {t['test']} | {t['seconds']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(worker_main({"profile": profile}))
