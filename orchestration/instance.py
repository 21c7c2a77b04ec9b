"""The persistent Dagster instance under data/dagster: run history, sensor cursors, pool limits.

`dg dev`, the daemon and the `alliance` CLI all use this one instance (DAGSTER_HOME =
data/dagster), so a run started from the CLI shows in the UI and waits for the same pool slots.
`ensure_instance_config` writes `data/dagster/dagster.yaml`; it rewrites the file only while it
still carries our header, so an operator who edits it and removes the header keeps their version.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import yaml
from dagster_shared.check import CheckError

from alliance.config import ConfigError, DataPaths, paths

WRITER_POOL = "duckdb_writer"
MANAGED_HEADER = "# Managed by orchestration/instance.py"

# Why each setting:
# - pools.default_limit 1 + granularity op: every step tagged pool="duckdb_writer" (all steps that
#   write the working DuckDB file) waits for the single slot, across runs and processes, so two
#   runs never fight over DuckDB's one-writer lock.
# - runs.tag_concurrency_limits alliance/writer = 1: queued runs of the writer jobs (ingest,
#   nightly rebuild, publish, as-of) start one at a time, so a run's publish never copies a
#   warehouse another run has half updated (the pool alone would interleave their steps).
# - runs.max_concurrent_runs: bounds memory on a 2-core machine (reports may run alongside).
# - telemetry off: clinics run this on machines that should not phone home.
DAGSTER_YAML = f"""{MANAGED_HEADER} (delete this line to keep local edits).
# Dagster instance for the alliance platform. Docs: docs/operations.md.
concurrency:
  pools:
    default_limit: 1
    granularity: op
  runs:
    max_concurrent_runs: 4
    tag_concurrency_limits:
      - key: "alliance/writer"
        limit: 1
run_monitoring:
  enabled: true
  free_slots_after_run_end_seconds: 30
telemetry:
  enabled: false
"""


def ensure_instance_config(data_paths: DataPaths | None = None) -> Path:
    """Write data/dagster/dagster.yaml (if absent or still ours) and return DAGSTER_HOME."""
    p = data_paths or paths()
    home = p.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists() or (
        cfg.read_text(encoding="utf-8").startswith(MANAGED_HEADER)
        and cfg.read_text(encoding="utf-8") != DAGSTER_YAML
    ):
        tmp = cfg.with_suffix(".yaml.tmp")
        tmp.write_text(DAGSTER_YAML, encoding="utf-8")
        os.replace(tmp, cfg)
    return home


def use_instance_home(data_paths: DataPaths | None = None) -> Path:
    """Point DAGSTER_HOME at data/dagster (creating its config) for this process and children."""
    home = ensure_instance_config(data_paths)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def get_instance(data_paths: DataPaths | None = None) -> dg.DagsterInstance:
    """The persistent instance under data/dagster, with the writer pool limit set explicitly."""
    home = use_instance_home(data_paths)
    try:
        instance = dg.DagsterInstance.from_config(str(home))
    except (yaml.YAMLError, dg.DagsterInvalidConfigError, CheckError, TypeError,
            AttributeError) as e:  # (a file that is no mapping fails Dagster's own checks)
        # (an operator's edit of the file, which is kept once its header is gone: a traceback
        # from Dagster's config loader before)
        detail = " ".join(str(e).split())
        raise ConfigError(
            f"{home / 'dagster.yaml'}: the Dagster instance settings cannot be read ({detail[:600]}). "
            "Fix the file, or delete it to get the platform's default (docs/operations.md)."
        ) from e
    # Explicit limit so the UI's Concurrency page shows it even before the first run; the
    # default_limit in dagster.yaml covers instances where this was never called.
    try:
        limits = {p.name: p.limit for p in instance.event_log_storage.get_pool_limits()}
        if limits.get(WRITER_POOL) != 1:
            instance.event_log_storage.set_concurrency_slots(WRITER_POOL, 1)
    except NotImplementedError:  # storages without global concurrency support
        pass
    return instance
