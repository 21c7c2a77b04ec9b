"""What the importers need to know about instruments: codes, item counts and ranges, LOINC codes.

Built from alliance.instruments.load_instruments (the same validated definitions the ingest and
scoring use, including a clinic's own files), so importing needs no code per instrument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache


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


@lru_cache(maxsize=4)
def load_refs() -> dict[str, InstrumentRef]:
    """Instrument code -> reference, from the validated definitions the ingest and scoring use."""
    from alliance.instruments import load_instruments

    refs: dict[str, InstrumentRef] = {}
    for inst in sorted(load_instruments().values(), key=lambda i: i.key):
        items = inst.items
        refs[inst.code] = InstrumentRef(
            code=inst.code,
            version=inst.version,
            item_count=len(items),
            item_min=min((it.min_value for it in items), default=None),
            item_max=max((it.max_value for it in items), default=None),
            total_min=inst.total_min,
            total_max=inst.total_max,
            loinc_panel=inst.loinc_panel,
            loinc_total=inst.loinc_total,
            loinc_items={it.loinc: str(it.number) for it in items if it.loinc},
        )
    return refs
