"""Where the platform reads and writes: one data directory, moved with ALLIANCE_DATA_DIR."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMAS_DIR = REPO_ROOT / "schemas"
SQL_DIR = REPO_ROOT / "dbt_like_sql"


@dataclass(frozen=True)
class DataPaths:
    """Every path the platform writes to, all below one root."""

    root: Path

    @property
    def landing(self) -> Path:
        return self.root / "landing"

    @property
    def warehouse(self) -> Path:
        """The pipeline's working DuckDB file (one writer process at a time)."""
        return self.root / "warehouse" / "alliance.duckdb"

    @property
    def serving_dir(self) -> Path:
        return self.root / "serving"

    @property
    def serving(self) -> Path:
        """The published read-only snapshot analysts and reports open."""
        return self.serving_dir / "alliance.duckdb"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def quarantine(self) -> Path:
        """Verbatim copies of rejected lines (they may hold raw identifiers)."""
        return self.root / "quarantine"

    @property
    def quality_docs(self) -> Path:
        return self.root / "quality-docs"

    @property
    def dagster_home(self) -> Path:
        return self.root / "dagster"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    def ensure(self) -> DataPaths:
        for p in (self.landing, self.warehouse.parent, self.serving_dir, self.reports,
                  self.quarantine, self.dagster_home):
            p.mkdir(parents=True, exist_ok=True)
        return self


class ConfigError(ValueError):
    """An environment setting holds a value the platform cannot use; the message names the
    variable, the value and what is allowed (the CLI prints it without a traceback)."""


def env_number(name: str, default: float, *, minimum: float | None = None,
               integer: bool = False) -> float:
    """$name as a number (default when unset or empty), checked against `minimum`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not {'an integer' if integer else 'a number'}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}={raw!r} is not a finite number")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum:g}")
    return value


def is_timezone(name: str) -> bool:
    """Whether `name` is an IANA time zone this machine knows (a folder of the zone database,
    such as 'Europe', is not: ZoneInfo raises an OSError for it)."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


# DuckDB's own wording of a file lock held by another process.
DUCKDB_LOCK_WORDING = ("could not set lock on file", "conflicting lock is held",
                       "resource temporarily")


def is_duckdb_lock_error(e: BaseException) -> bool:
    """Whether `e` is DuckDB refusing a file another process holds: its own wording, not any
    message that happens to contain 'lock' (a damaged file under a folder named 'blocks')."""
    import duckdb

    text = str(e).lower()
    return isinstance(e, duckdb.IOException) and any(w in text for w in DUCKDB_LOCK_WORDING)


def data_dir() -> Path:
    """The data directory: $ALLIANCE_DATA_DIR (unset or empty: ./data)."""
    root = Path(os.environ.get("ALLIANCE_DATA_DIR", "").strip() or "data").resolve()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"ALLIANCE_DATA_DIR={str(root)!r} is a file, not a folder")
    return root


def paths(root: str | os.PathLike[str] | None = None) -> DataPaths:
    return DataPaths(Path(root).resolve() if root is not None else data_dir())


MEMORY_LIMIT_ENV = "ALLIANCE_DUCKDB_MEMORY_LIMIT"
DEFAULT_MEMORY_LIMIT = "4GB"


def warehouse_config() -> dict[str, str]:
    """DuckDB settings of every connection that writes the working warehouse.

    `memory_limit` caps DuckDB's buffer pool (default 4GB, `$ALLIANCE_DUCKDB_MEMORY_LIMIT`):
    DuckDB's own default is 80% of the machine's RAM, which let a 10^7-event rebuild reach
    11.7 GB. Above the limit DuckDB spills to `<warehouse>.tmp/` beside the file, inside the
    data directory. Measured in docs/benchmark.md.
    """
    limit = os.environ.get(MEMORY_LIMIT_ENV, "").strip() or DEFAULT_MEMORY_LIMIT
    if limit != DEFAULT_MEMORY_LIMIT:
        import duckdb

        try:  # DuckDB's own parser decides (4GB, 4G, 512MiB, -1, none, ...)
            duckdb.connect(config={"memory_limit": limit}).close()
        except duckdb.Error as e:
            raise ConfigError(f"{MEMORY_LIMIT_ENV}={limit!r} is not a size DuckDB reads (such as "
                              f"4GB or 512MB): {str(e).splitlines()[0]}") from None
    return {"memory_limit": limit}
