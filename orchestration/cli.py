"""The `alliance` command: thin wrappers over the same code and Dagster definitions the UI uses."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes `register(subparsers)` and sets `func` on its parser. Add a module, add a line.
COMMANDS = [
    "orchestration.cli_core",
    "orchestration.cli_import",
    "orchestration.cli_ops",
    "orchestration.cli_report",
    "orchestration.cli_simulate",
    "orchestration.cli_bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alliance",
        description="Therapeutic alliance and outcome data platform.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dg"]:
        # everything after `dg` is dg's, options included (argparse took `alliance dg --help`
        # and refused `alliance dg --version`)
        from orchestration.cli_ops import cmd_dg

        args = argparse.Namespace(command="dg", dg_args=argv[1:], func=cmd_dg)
    else:
        args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    import duckdb

    from alliance.config import ConfigError
    from alliance.contract import ContractError
    from alliance.instruments import InstrumentError
    from alliance.pseudonyms import MissingKeyError

    try:
        return int(args.func(args) or 0)
    except (MissingKeyError, ConfigError, InstrumentError, ContractError) as e:
        # a configuration error, not a bug: the message names the variable or file, no traceback
        print(f"alliance {args.command}: {e}", file=sys.stderr)
        return 2
    except duckdb.IOException as e:
        # a DuckDB file that cannot be opened (damaged, not a DuckDB file, locked past the wait):
        # DuckDB's message names the file; the traceback adds nothing for an operator
        print(f"alliance {args.command}: DuckDB could not open, read or write a file: {e}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
