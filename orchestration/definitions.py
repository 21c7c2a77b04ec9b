"""The one entry point: every asset, check, job, schedule and sensor is reachable from here."""

from __future__ import annotations

import importlib

import dagster as dg

from orchestration.resources import default_resources

# Each module exposes `defs() -> dg.Definitions`; they are merged here. Add a module, add a line.
MODULES = [
    "assets.ingest",
    "assets.sql_models",
    "quality.checks",
    "assets.seeds",
    "assets.publish",
    "assets.reports",
    "assets.exports",
    "orchestration.jobs",
    "orchestration.sensors",
    "orchestration.schedules",
]


def build_definitions() -> dg.Definitions:
    parts = [importlib.import_module(m).defs() for m in MODULES]
    merged = dg.Definitions.merge(*parts)
    return dg.Definitions.merge(merged, dg.Definitions(resources=default_resources()))


defs = build_definitions()
