"""Resources shared by every asset: the DuckDB working warehouse and the platform settings."""

from __future__ import annotations

import dagster as dg
from dagster_duckdb import DuckDBResource

from alliance.config import DataPaths, paths


class AllianceSettings(dg.ConfigurableResource):
    """Platform settings: data directory, demo mode (local pseudonym key), as-of cutoff."""

    data_dir: str = ""  # empty: $ALLIANCE_DATA_DIR or ./data
    demo: bool = False

    @property
    def paths(self) -> DataPaths:
        return paths(self.data_dir or None)


def default_resources() -> dict[str, object]:
    p = paths()
    return {
        "duckdb": DuckDBResource(database=str(p.warehouse)),
        "settings": AllianceSettings(),
    }
