"""Dagster assets for the seed tables: instrument definitions and clinical rule parameters.

`seeds/instruments` and its sibling tables are built from schemas/instruments/*.yaml (plus any
folder in $ALLIANCE_INSTRUMENTS_DIR); `seeds/parameters` from dbt_like_sql/parameters.yml. The
SQL models that read `seeds.<table>` depend on `seeds/<table>` through the SQL runner's parsing.
"""

from collections.abc import Iterator

import dagster as dg
from dagster_duckdb import DuckDBResource

from alliance import instruments as inst
from alliance.config import SQL_DIR

PARAMETERS_FILE = SQL_DIR / "parameters.yml"
POOL = "duckdb_writer"  # one DuckDB writer at a time (same pool as the SQL models)

_PLACEHOLDER = """\
# Clinical rule parameters, as data: a list of {name, value, doc, source}. Loaded into
# seeds.parameters (name, value_double, value_text, doc, source).
[]
"""


def _column_schema(table: str) -> dg.TableSchema:
    return dg.TableSchema(columns=[
        dg.TableColumn(name=n, type=t, description=d) for n, t, d in inst.SEED_TABLES[table][1]
    ])


def _spec(table: str) -> dg.AssetSpec:
    return dg.AssetSpec(
        key=dg.AssetKey(["seeds", table]),
        description=inst.SEED_TABLES[table][0],
        group_name="seeds",
        kinds={"duckdb"},
        owners=["team:data-engineering"],
        metadata={
            "dagster/table_name": f"seeds.{table}",
            "dagster/column_schema": _column_schema(table),
        },
    )


@dg.multi_asset(
    name="seeds_instruments",
    specs=[_spec(t) for t in inst.SEED_TABLES],
    description="Instrument definitions from schemas/instruments/*.yaml as seeds.* tables.",
    pool=POOL,
)
def instrument_seeds(
    context: dg.AssetExecutionContext, duckdb: DuckDBResource
) -> Iterator[dg.MaterializeResult]:
    # Loading validates every file: a malformed definition fails here, naming file and field.
    defs = inst.load_instruments()
    with duckdb.get_connection() as con:
        counts = inst.write_seed_tables(con, defs)
    context.log.info(f"{len(defs)} instruments: {sorted(f'{c} v{v}' for c, v in defs)}")
    for table, n in counts.items():
        yield dg.MaterializeResult(
            asset_key=dg.AssetKey(["seeds", table]),
            metadata={"dagster/row_count": n, "instruments": len(defs)},
        )


@dg.asset(
    key=dg.AssetKey(["seeds", "parameters"]),
    group_name="seeds",
    kinds={"duckdb"},
    owners=["team:data-engineering"],
    description="Clinical rule parameters with citations, from dbt_like_sql/parameters.yml.",
    metadata={
        "dagster/table_name": "seeds.parameters",
        "dagster/column_schema": dg.TableSchema(columns=[
            dg.TableColumn(name=n, type=t, description=d) for n, t, d in inst.PARAMETER_COLUMNS
        ]),
    },
    pool=POOL,
)
def parameters_seed(duckdb: DuckDBResource) -> dg.MaterializeResult:
    if not PARAMETERS_FILE.exists():  # a fresh tree: start an empty, documented list
        PARAMETERS_FILE.write_text(_PLACEHOLDER, encoding="utf-8")
    with duckdb.get_connection() as con:
        n = inst.write_parameters_table(con, PARAMETERS_FILE)
    return dg.MaterializeResult(metadata={"dagster/row_count": n})


def defs() -> dg.Definitions:
    # Validate every instrument definition when the definitions load: a malformed file stops
    # `dg check defs`, `dg dev` and the daemon, naming file, line and field, instead of letting
    # them start and every run fail (0.15 s).
    inst.load_instruments()
    return dg.Definitions(assets=[instrument_seeds, parameters_seed])
