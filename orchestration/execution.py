"""Run the platform's assets in-process against the persistent instance (CLI and demo share it)."""

from __future__ import annotations

from collections.abc import Callable

import dagster as dg


def _definitions() -> dg.Definitions:
    from orchestration.definitions import build_definitions

    return build_definitions()


def unpartitioned_selection(defs: dg.Definitions) -> list[dg.AssetKey]:
    graph = defs.resolve_asset_graph()
    return [k for k in graph.materializable_asset_keys if graph.get(k).partitions_def is None]


def run_all(log: Callable[[str], None] = print, tags: dict[str, str] | None = None) -> dict:
    """Materialise every unpartitioned asset with its checks, then the latest report partitions."""
    from orchestration.instance import get_instance

    defs = _definitions()
    instance = get_instance()
    keys = unpartitioned_selection(defs)
    log(f"materialising {len(keys)} assets and their checks in one Dagster run ...")
    assets = [*(defs.assets or []), *(defs.asset_checks or [])]
    result = dg.materialize(
        assets,
        selection=keys,
        instance=instance,
        resources=defs.resources,
        tags={"alliance/trigger": "cli", **(tags or {})},
        raise_on_error=False,
    )
    failed_checks = [
        e.asset_check_evaluation_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION" and not e.asset_check_evaluation_data.passed
    ]
    for ev in failed_checks:
        log(f"  check failed: {ev.asset_key.to_user_string()} {ev.check_name} ({ev.severity.value})")
    log(f"run {result.run_id[:8]} {'succeeded' if result.success else 'FAILED'}")
    return {"success": result.success, "run_id": result.run_id, "failed_checks": len(failed_checks)}
