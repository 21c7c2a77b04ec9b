"""Snapshot of the asset graph (keys, deps, groups, checks, jobs, schedules, sensors).

A change to the graph shows in review as a change to tests/snapshots/asset_graph.json.
Regenerate deliberately with: UPDATE_SNAPSHOTS=1 .venv/bin/pytest tests/test_asset_graph.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"


def graph_summary() -> dict:
    from orchestration.definitions import build_definitions

    defs = build_definitions()
    graph = defs.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "group": node.group_name,
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "checks": sorted(c.name for c in node.check_keys),
            "partitioned": node.partitions_def is not None,
            "has_description": bool(node.description),
            "owners": sorted(node.owners),
            "kinds": sorted(node.kinds),
        }
    return {
        "assets": assets,
        "jobs": sorted(j.name for j in defs.resolve_all_job_defs() if not j.name.startswith("__")),
        "schedules": sorted(s.name for s in defs.schedules or []),
        "sensors": sorted(s.name for s in defs.sensors or []),
    }


def test_asset_graph_matches_snapshot():
    current = graph_summary()
    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    # (a missing snapshot fails: written here, the graph would be compared with itself)
    assert SNAPSHOT.exists(), f"{SNAPSHOT} is missing: review the graph and write it with UPDATE_SNAPSHOTS=1"
    assert current == json.loads(SNAPSHOT.read_text()), (
        "the asset graph changed; review and regenerate with UPDATE_SNAPSHOTS=1"
    )


def test_every_asset_is_described_and_grouped():
    for key, node in graph_summary()["assets"].items():
        assert node["has_description"], f"{key} has no description"
        assert node["group"] and node["group"] != "default", f"{key} has no group"


def test_every_asset_has_a_description_kinds_and_an_owner():
    missing = {k: v for k, v in graph_summary()["assets"].items()
               if not (v["has_description"] and v["owners"] and v["kinds"])}
    assert not missing, missing
