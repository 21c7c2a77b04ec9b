"""`alliance simulate`: write a synthetic clinic network's daily exports and its ground truth."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date


def _start(s: str) -> date:
    try:
        return date.fromisoformat(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--start must be YYYY-MM-DD, got {s!r}") from e


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `simulate` subcommand."""
    p = subparsers.add_parser(
        "simulate",
        help="simulate clinics into daily canonical NDJSON exports (+ ground truth)",
        description="Simulate a clinic network: daily export files export-YYYY-MM-DD.ndjson[.gz] "
                    "in --out and a ground-truth JSON beside it (default <out>/../"
                    "simulation_truth.json). Deterministic for a seed.",
    )
    p.add_argument("--out", required=True, help="landing folder to write the exports into")
    p.add_argument("--clinics", type=int, default=3)
    p.add_argument("--patients", type=int, default=1500)
    p.add_argument("--events", type=int, default=None, metavar="N",
                   help="size the run by about N valid events instead of --patients")
    p.add_argument("--therapists-per-clinic", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--start", type=_start, default=date(2025, 1, 6), help="first day (YYYY-MM-DD)")
    p.add_argument("--months", type=int, default=18)
    p.add_argument("--gzip", action="store_true", help="write .ndjson.gz files")
    p.add_argument("--bad-share", type=float, default=0.01,
                   help="share of lines that are bad records (default 0.01)")
    p.add_argument("--alliance-outcome-r", type=float, default=0.28,
                   help="target early-alliance/outcome correlation (default 0.28)")
    p.add_argument("--outcome-interval", type=int, default=1,
                   help="PHQ-9 and GAD-7 every N attended sessions (default 1)")
    p.add_argument("--truth", default=None, metavar="FILE", help="ground-truth JSON path")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the simulator with the parsed arguments and print its summary as JSON."""
    from alliance.simulator import simulate

    try:
        summary = simulate(
            args.out, clinics=args.clinics, patients=args.patients, seed=args.seed,
            start=args.start, months=args.months,
            therapists_per_clinic=args.therapists_per_clinic, gzip=args.gzip,
            bad_share=args.bad_share, alliance_outcome_r=args.alliance_outcome_r,
            truth_path=args.truth, events_target=args.events,
            outcome_interval=args.outcome_interval,
        )
    except ValueError as e:
        print(f"alliance simulate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1))
    return 0
