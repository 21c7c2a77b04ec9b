"""The event contract (schemas/events.yaml) as Python data."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from alliance import yamlio
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
        return parse_contract(yamlio.safe_load(f), str(path))


def _field_row(f: FieldSpec) -> str:
    rules = []
    if f.values:
        rules.append("one of " + ", ".join(f"`{v}`" for v in f.values))
    if f.pattern:
        rules.append(f"pattern `{f.pattern}`")
    if f.minimum is not None or f.maximum is not None:
        rules.append(f"range {f.minimum}..{f.maximum}")
    if f.pseudonymise:
        rules.append(f"pseudonymised ({f.pseudonymise})")
    return (f"| `{f.name}` | {f.type} | {'yes' if f.required else ''} | "
            f"{'; '.join(rules)} | {f.doc} |")


def contract_markdown(contract: Contract | None = None) -> str:
    """The contract as Markdown, field by field (docs/event-contract.md is generated from this)."""
    c = contract or load_contract()
    out = [
        "# Event contract",
        "",
        f"Generated from `schemas/events.yaml` (contract version {c.version}) by "
        "`alliance contract-docs`; do not edit by hand.",
        "",
        "One JSON object per line (NDJSON, UTF-8; `.gz` allowed). Lines that break the contract go "
        "to `raw.quarantine` with a reason code, the file, the line and the field.",
        "",
        "Types: a `timestamp` is an ISO-8601 date and time with its UTC offset, "
        "`YYYY-MM-DDThh:mm:ss[.fraction]` followed by `Z` or `+hh:mm` / `-hh:mm` (a space may "
        "replace the `T`; the offset's colon and minutes may be left out; the seconds may not), "
        "with years 0001-9999, hours 00-23 and offsets within -23:59..+23:59; a `date` is "
        "`YYYY-MM-DD`. Both must be real calendar dates. An `integer` is a JSON number without "
        "fraction or exponent.",
        "",
        "## Envelope",
        "",
        "| field | type | required | rules | meaning |",
        "|---|---|---|---|---|",
        *(_field_row(f) for f in c.envelope.values()),
        "",
        "## Event types",
    ]
    for et in c.event_types.values():
        out += [
            "",
            f"### `{et.name}`",
            "",
            et.doc,
            "",
            f"Schema versions: {', '.join(map(str, et.schema_versions))}. "
            f"Envelope fields required besides the always-required ones: "
            f"{', '.join(f'`{r}`' for r in et.requires) or 'none'}.",
            "",
        ]
        if et.payload:
            out += ["| payload field | type | required | rules | meaning |", "|---|---|---|---|---|",
                    *(_field_row(f) for f in et.payload.values())]
        else:
            out.append("Payload: `{}` (no fields).")
    out += ["", "## Quarantine reason codes", "", "| code | meaning |", "|---|---|",
            *(f"| `{k}` | {v} |" for k, v in c.quarantine_reasons.items()), ""]
    return "\n".join(out)
