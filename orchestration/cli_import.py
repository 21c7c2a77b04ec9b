"""`alliance import fhir|redcap|wide-csv PATH --mapping FILE`: foreign exports into landing/.

The importers write canonical NDJSON into the landing folder, so everything after an import (the
sensor, ingest, quality checks, models) is the same pipeline as for native files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from alliance.config import paths


def register(sub: argparse._SubParsersAction) -> None:
    imp = sub.add_parser(
        "import",
        help="convert FHIR R4, REDCap or research CSV exports into canonical events in landing/",
        description="Convert a foreign export into canonical NDJSON in the landing folder "
        "(<stem>.ndjson), with <stem>.quarantine.tsv (file, line, reason of every unmappable "
        "record) and <stem>.summary.json (every input line accounted for) into the data "
        "directory's quarantine/ folder (beside the NDJSON when --out is outside the data directory).",
    )
    kinds = imp.add_subparsers(dest="import_kind", metavar="KIND", required=True)

    def common(p: argparse.ArgumentParser, mapping_help: str) -> None:
        p.add_argument("--mapping", required=True, help=mapping_help)
        p.add_argument("--out", type=Path, default=None,
                       help="output folder (default: the landing folder of $ALLIANCE_DATA_DIR)")
        p.add_argument("--clinic", default=None, help="clinic_id (overrides the mapping's)")
        p.add_argument("--strict", action="store_true",
                       help="exit with status 1 when any record was quarantined")

    f = kinds.add_parser("fhir", help="FHIR R4 bulk-export NDJSON, Bundles or resource files")
    f.add_argument("paths", nargs="+", type=Path, help="files or folders (read together)")
    common(f, "mapping YAML (a path, or a name under schemas/mappings/, e.g. fhir.yaml)")
    f.set_defaults(func=cmd_fhir)

    r = kinds.add_parser("redcap", help="REDCap flat CSV export with its data dictionary")
    r.add_argument("path", type=Path, help="the CSV export (raw or labels)")
    r.add_argument("--dictionary", type=Path, default=None,
                   help="data dictionary CSV (default: the mapping's data_dictionary)")
    common(r, "mapping YAML (see schemas/mappings/redcap.yaml)")
    r.set_defaults(func=cmd_redcap)

    w = kinds.add_parser("wide-csv", help="research CSV: wide (one row per patient) or long")
    w.add_argument("path", type=Path)
    common(w, "mapping YAML (e.g. schemas/mappings/sgdata.yaml, claus_2020.yaml)")
    w.set_defaults(func=cmd_wide_csv)


def _out(args: argparse.Namespace) -> Path:
    return args.out if args.out is not None else paths().landing


def _report(result, strict: bool) -> int:  # type: ignore[no-untyped-def]
    s = result.summary()
    print(json.dumps({
        "events_file": str(result.events_path),
        "events": s["events"],
        "events_by_type": s["events_by_type"],
        "quarantined": s["quarantined"],
        "quarantine_file": str(result.quarantine_path),
        "summary_file": str(result.summary_path),
        "balanced": s["balanced"],
    }, indent=2))
    if s.get("unmapped_columns"):
        print(f"[alliance] {len(s['unmapped_columns'])} column(s) of the input match nothing in the "
              f"mapping and were not imported: {', '.join(s['unmapped_columns'][:20])}",
              file=sys.stderr)
    if s["quarantined"]:
        print(f"[alliance] {s['quarantined']} record(s) quarantined: see {result.quarantine_path}",
              file=sys.stderr)
    return 1 if (strict and s["quarantined"]) else 0


def _run(fn, *a, **kw) -> object:  # type: ignore[no-untyped-def]
    from alliance.importers.common import MappingError
    from alliance.pseudonyms import MissingKeyError

    try:
        return fn(*a, **kw)
    except (MappingError, FileNotFoundError, MissingKeyError) as e:
        print(f"[alliance] import failed: {e}", file=sys.stderr)
        return None


def cmd_fhir(args: argparse.Namespace) -> int:
    from alliance.importers.fhir import import_fhir_to_landing

    res = _run(import_fhir_to_landing, args.paths, args.mapping, _out(args), clinic_id=args.clinic)
    return 2 if res is None else _report(res, args.strict)


def cmd_redcap(args: argparse.Namespace) -> int:
    from alliance.importers.common import MappingError, load_mapping
    from alliance.importers.redcap import import_redcap_to_landing

    try:
        m = load_mapping(args.mapping, "redcap")
    except MappingError as e:
        print(f"[alliance] import failed: {e}", file=sys.stderr)
        return 2
    dictionary = args.dictionary
    if dictionary is None and m.get("data_dictionary"):
        dictionary = args.path.parent / str(m["data_dictionary"])
    if dictionary is None:
        print("[alliance] import failed: give --dictionary FILE or data_dictionary in the mapping",
              file=sys.stderr)
        return 2
    res = _run(import_redcap_to_landing, args.path, dictionary, m, _out(args),
               clinic_id=args.clinic)
    return 2 if res is None else _report(res, args.strict)


def cmd_wide_csv(args: argparse.Namespace) -> int:
    from alliance.importers.wide_csv import import_wide_csv_to_landing

    res = _run(import_wide_csv_to_landing, args.path, args.mapping, _out(args),
               clinic_id=args.clinic)
    return 2 if res is None else _report(res, args.strict)
