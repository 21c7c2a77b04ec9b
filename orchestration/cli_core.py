"""`alliance demo` and `alliance pseudonym`: the first-run experience and the clinic's key lookup."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from alliance.config import paths

QUERY_HINT = (
    ".venv/bin/python -c \"import duckdb; c = duckdb.connect('{db}', read_only=True); "
    "c.sql('select * from marts.clinic_monthly order by month desc limit 10').show()\""
)


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo",
        help="simulate a demo clinic network and build the warehouse and reports",
        description="Simulate about 3 clinics, 30 therapists and 1,500 patients (with a small share "
        "of bad records) into data/landing, then materialise every asset and print a summary.",
    )
    d.add_argument("--clinics", type=int, default=3)
    d.add_argument("--patients", type=int, default=1500)
    d.add_argument("--seed", type=int, default=42)
    d.add_argument("--fresh", action="store_true", help="delete the data directory first")
    d.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "pseudonym",
        help="compute the pseudonym of one of the clinic's own identifiers (needs the key)",
        description="Recompute a pseudonym with $ALLIANCE_PSEUDONYM_KEY (or the demo key) so a "
        "clinic can act on an alert about pt_.../th_... in a report.",
    )
    p.add_argument("kind", choices=["patient", "therapist", "episode", "session"])
    p.add_argument("clinic_id")
    p.add_argument("identifier")
    p.add_argument("--demo", action="store_true", help="use the demo key under data/secrets")
    p.set_defaults(func=cmd_pseudonym)

    c = sub.add_parser("contract-docs", help="regenerate docs/event-contract.md from schemas/events.yaml")
    c.set_defaults(func=cmd_contract_docs)


def cmd_contract_docs(args: argparse.Namespace) -> int:
    from alliance.config import REPO_ROOT
    from alliance.contract import contract_markdown

    out = REPO_ROOT / "docs" / "event-contract.md"
    out.write_text(contract_markdown())
    print(out)
    return 0


def _say(msg: str) -> None:
    print(f"[alliance] {msg}", flush=True)


def cmd_pseudonym(args: argparse.Namespace) -> int:
    from alliance.pseudonyms import KEY_ENV, load_key, platform_key, pseudonym

    demo_key = paths().secrets / "demo_pseudonym_key"
    if args.demo and not demo_key.exists() and not os.environ.get(KEY_ENV):
        # a new key would give a pseudonym that matches nothing (and later demo runs would use it)
        print(f"alliance pseudonym --demo: no demo key at {demo_key}; run `alliance demo` first, "
              "or check ALLIANCE_DATA_DIR", file=sys.stderr)
        return 2
    if not args.identifier.strip():
        # (the ingest reads an empty or blank identifier as missing: no event has its pseudonym)
        print("alliance pseudonym: the identifier is empty or blank; the ingest treats such an "
              "identifier as missing, so no event carries a pseudonym of it", file=sys.stderr)
        return 2
    from alliance.contract import load_contract

    clinic_pattern = load_contract().envelope["clinic_id"].pattern
    if not re.fullmatch(clinic_pattern, args.clinic_id):
        print(f"alliance pseudonym: clinic_id {args.clinic_id!r} does not match the contract's "
              f"pattern {clinic_pattern}, so no event carries it", file=sys.stderr)
        return 2
    # (without --demo: the key as the pipeline reads it, $ALLIANCE_PSEUDONYM_KEY or, with
    # ALLIANCE_DEMO=1, the demo key)
    key = load_key(demo_key) if args.demo else platform_key()
    print(pseudonym(key, args.kind, args.clinic_id, args.identifier))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import shutil

    t0 = time.perf_counter()
    if args.clinics < 1 or args.patients < 1:
        print(f"alliance demo: --clinics and --patients must be at least 1 (got {args.clinics} "
              f"and {args.patients})", file=sys.stderr)
        return 2
    p = paths()
    if args.fresh and p.root.exists():
        shutil.rmtree(p.root)
    os.environ["ALLIANCE_DEMO"] = "1"
    p.ensure()
    from alliance.pseudonyms import KEY_ENV

    if not os.environ.get(KEY_ENV):
        _say(f"demo mode: {KEY_ENV} is not set, so a local demo key is used "
             f"({p.secrets / 'demo_pseudonym_key'}); never use it for real data")
    from alliance.simulator import simulate

    truth = p.root / "simulation" / "ground_truth.json"
    if not any(p.landing.iterdir()):
        _say(f"simulating {args.clinics} clinics, {args.patients} patients (seed {args.seed}) "
             f"into {p.landing} ...")
        summary = simulate(p.landing, clinics=args.clinics, patients=args.patients, seed=args.seed,
                           truth_path=truth)
        _say(f"  {summary.get('events', summary.get('lines', '?'))} lines in "
             f"{summary.get('files', '?')} daily export files ({time.perf_counter() - t0:.1f}s)")
    else:
        _say(f"landing folder {p.landing} is not empty: using the files already there")

    from orchestration.execution import run_all

    outcome = run_all(log=_say)
    _summary(p, outcome, time.perf_counter() - t0)
    return 0 if outcome.get("success") else 1


def _summary(p, outcome: dict, seconds: float) -> None:
    import duckdb

    db = p.serving if p.serving.exists() else p.warehouse
    with duckdb.connect(str(db), read_only=True) as con:
        accepted, files = con.execute(
            "select count(*), count(distinct file_id) from raw.events").fetchone()
        reasons = con.execute(
            "select reason_code, count(*) from raw.quarantine group by 1 order by 2 desc").fetchall()
        dups = con.execute("select coalesce(sum(duplicates), 0) from raw.ingested_files").fetchone()[0]
        tables = con.execute(
            "select schema_name, table_name from duckdb_tables() where database_name = "
            "current_database() and not internal and not temporary order by 1, 2").fetchall()
        counts = [(s, t, con.execute(f'select count(*) from "{s}"."{t}"').fetchone()[0])
                  for s, t in tables]
        views = con.execute(
            "select count(*) from duckdb_views() where database_name = current_database() "
            "and not internal and not temporary").fetchone()[0]
    print()
    print("=" * 72)
    print(f"Demo finished in {seconds:.0f}s " + ("(all runs succeeded)" if outcome.get("success")
                                                else "(SOME RUNS FAILED: see above)"))
    print(f"Events accepted: {accepted:,} from {files} files; exact duplicates skipped: {dups:,}")
    print(f"Quarantined: {sum(n for _, n in reasons):,} "
          + ("(" + ", ".join(f"{r} {n}" for r, n in reasons) + ")" if reasons else ""))
    print(f"Tables ({len(counts)}; plus {views} staging views over raw.events):")
    for s, t, n in counts:
        print(f"  {s + '.' + t:<45} {n:>12,} rows")
    reports = sorted(p.reports.rglob("*.html"))
    if reports:
        print(f"Reports: {len(reports)} HTML files under {p.reports}, e.g. {reports[-1]}")
    print(f"Warehouse (working): {p.warehouse}")
    print(f"Published snapshot for analysts: {db}")
    print("Query it:")
    shown = os.path.relpath(db) if db.is_relative_to(Path.cwd()) else str(db)
    print("  " + QUERY_HINT.format(db=shown))
    print("=" * 72)

