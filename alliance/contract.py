"""The event contract (schemas/events.yaml) as Python data."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from alliance.config import SCHEMAS_DIR

CONTRACT_FILE = SCHEMAS_DIR / "events.yaml"
FIELD_TYPES = {"string", "integer", "number", "boolean", "timestamp", "date", "object", "enum"}
ID_FIELDS = ("patient_id", "therapist_id", "episode_id", "session_id")


class ContractError(ValueError):
    """The contract file itself is malformed."""


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: str
    required: bool = False
    doc: str = ""
    values: tuple[str, ...] = ()
    pattern: str | None = None
    minimum: float | None = None
    maximum: float | None = None
    pseudonymise: str | None = None


@dataclass(frozen=True)
class EventType:
    name: str
    doc: str
    schema_versions: tuple[int, ...]
    requires: tuple[str, ...]
    payload: dict[str, FieldSpec] = field(default_factory=dict)


@dataclass(frozen=True)
class Contract:
    version: int
    envelope: dict[str, FieldSpec]
    event_types: dict[str, EventType]
    quarantine_reasons: dict[str, str]


def _field(name: str, spec: dict[str, Any], where: str) -> FieldSpec:
    if not isinstance(spec, dict) or spec.get("type") not in FIELD_TYPES:
        raise ContractError(f"{where}: field '{name}' needs a type, one of {sorted(FIELD_TYPES)}")
    if spec["type"] == "enum" and not spec.get("values"):
        raise ContractError(f"{where}: enum field '{name}' needs values")
    return FieldSpec(
        name=name,
        type=spec["type"],
        required=bool(spec.get("required", False)),
        doc=str(spec.get("doc", "")),
        values=tuple(spec.get("values") or ()),
        pattern=spec.get("pattern"),
        minimum=spec.get("minimum"),
        maximum=spec.get("maximum"),
        pseudonymise=spec.get("pseudonymise"),
    )


def parse_contract(raw: dict[str, Any], where: str = str(CONTRACT_FILE)) -> Contract:
    try:
        envelope = {n: _field(n, s, f"{where} envelope") for n, s in raw["envelope"].items()}
        types = {}
        for name, t in raw["event_types"].items():
            unknown = set(t.get("requires", [])) - set(envelope)
            if unknown:
                raise ContractError(f"{where}: {name} requires unknown envelope fields {unknown}")
            types[name] = EventType(
                name=name,
                doc=str(t.get("doc", "")),
                schema_versions=tuple(int(v) for v in t["schema_versions"]),
                requires=tuple(t.get("requires", [])),
                payload={
                    n: _field(n, s, f"{where} {name}.payload")
                    for n, s in (t.get("payload") or {}).items()
                },
            )
        return Contract(int(raw["contract_version"]), envelope, types, dict(raw["quarantine_reasons"]))
    except KeyError as e:
        raise ContractError(f"{where}: missing section {e}") from e


@lru_cache(maxsize=4)
def load_contract(path: Path = CONTRACT_FILE) -> Contract:
    with open(path) as f:
        return parse_contract(yaml.safe_load(f), str(path))
