"""What the importers need to know about instruments: codes, item counts and ranges, LOINC codes.

Read straight from schemas/instruments/*.yaml (the same files the ingest and scoring use), so a
clinic that adds an instrument file can import it without code changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import yaml

from alliance.config import SCHEMAS_DIR


@dataclass(frozen=True)
class InstrumentRef:
    """The importer's view of one instrument definition."""

    code: str
    version: str
    item_count: int = 0
    item_min: float | None = None
    item_max: float | None = None
    total_min: float | None = None
    total_max: float | None = None
    loinc_panel: str | None = None
    loinc_total: str | None = None
    loinc_items: dict[str, str] = field(default_factory=dict)  # LOINC code -> item "1".."n"


def _num(v: object) -> float | None:
    try:
        return float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


@lru_cache(maxsize=4)
def load_refs(directory: Path = SCHEMAS_DIR / "instruments") -> dict[str, InstrumentRef]:
    """Instrument code -> reference, from every YAML file in the instruments folder."""
    refs: dict[str, InstrumentRef] = {}
    for p in sorted(directory.glob("*.y*ml")):
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError:
            continue  # the instruments' own tests report broken files; importers just skip them
        if not isinstance(d, dict) or "code" not in d:
            continue
        items = d.get("items") if isinstance(d.get("items"), dict) else {}
        total = d.get("total") if isinstance(d.get("total"), dict) else {}
        loinc = d.get("loinc") if isinstance(d.get("loinc"), dict) else {}
        item_loinc = items.get("loinc") or {}
        refs[str(d["code"])] = InstrumentRef(
            code=str(d["code"]),
            version=str(d.get("version", "1")),
            item_count=int(items.get("count") or 0),
            item_min=_num(items.get("min")),
            item_max=_num(items.get("max")),
            total_min=_num(total.get("min")),
            total_max=_num(total.get("max")),
            loinc_panel=str(loinc["panel"]) if loinc.get("panel") else None,
            loinc_total=str(loinc["total"]) if loinc.get("total") else None,
            loinc_items={str(code): str(item) for item, code in item_loinc.items()},
        )
    return refs
