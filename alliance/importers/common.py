"""Shared pieces of the importers: event building, accounting, and writing landing files.

Every importer turns foreign records (FHIR resources, REDCap rows, CSV rows) into canonical events
(schemas/events.yaml) and accounts for every record it read: it produced events, was skipped for a
stated reason (out of scope, e.g. a Procedure), or was quarantined (in scope but unmappable). The
identity ``records_read == produced + skipped + quarantined`` is checked before anything is written.

Quarantine entries hold file, line, reason code, field and a message, never the record itself:
foreign records carry names and addresses that must not be copied anywhere. The entries still name
source records (FHIR resource ids), so they are written to the data directory's quarantine folder,
not to landing/ (see :func:`report_dir`).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import hmac
import io
import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import yaml

from alliance import yamlio
from alliance.config import REPO_ROOT, is_timezone, paths

MAPPINGS_DIR = REPO_ROOT / "schemas" / "mappings"
CLINIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SCHEMA_VERSION = 1


class MappingError(ValueError):
    """A mapping file is malformed; the message names the file and the key."""


class InputFileError(MappingError):
    """An input file cannot be read as a whole (not UTF-8, a header naming a column twice, a
    folder); the message names the file and, where it can, the line. Nothing is imported."""


class KeyedEventIds:
    """Mixin of the importers: the platform key their event ids are made with (`event_id`).

    Given to the importer, or `alliance.pseudonyms.platform_key()` read when the first id is made
    (so a malformed mapping is reported first).
    """

    _key: bytes | None = None

    @functools.cached_property
    def key(self) -> bytes:
        from alliance.pseudonyms import platform_key

        return self._key if self._key is not None else platform_key()


def event_id(key: bytes, clinic_id: str, *parts: object) -> str:
    """A deterministic event id from the source record's own key, keyed like the pseudonyms.

    HMAC-SHA256 with the platform key (`alliance.pseudonyms.platform_key`) of the record's key
    parts, in UUID form (version 8, RFC 9562): the same record gives the same id on every import
    with the same key, so a re-sent export is a duplicate, and the id cannot be traced back to the
    patient or record number in it without the key. (An unkeyed uuid5 of `clinic|csv-episode|
    <patient number>` could: its namespace is public, and a patient number is quickly guessed.)
    """
    message = "event|" + "|".join([clinic_id, *map(str, parts)])
    n = int.from_bytes(hmac.new(key, message.encode(), hashlib.sha256).digest()[:16], "big")
    n = (n & ~(0xF << 76)) | (0x8 << 76)  # version 8 (custom)
    n = (n & ~(0x3 << 62)) | (0x2 << 62)  # RFC 9562 variant
    return str(uuid.UUID(int=n))


def load_mapping(path: str | os.PathLike[str], kind: str | None = None) -> dict[str, Any]:
    """Read a mapping YAML (a path, or a name under schemas/mappings/) and check its kind."""
    p = Path(path)
    if not p.exists() and (MAPPINGS_DIR / p).exists():
        p = MAPPINGS_DIR / p
    if not p.exists() and (MAPPINGS_DIR / f"{p}.yaml").exists():
        p = MAPPINGS_DIR / f"{p}.yaml"
    try:
        with open(p) as f:
            data = yamlio.safe_load(f)
    except FileNotFoundError as e:
        raise MappingError(f"{path}: mapping file not found (looked also in {MAPPINGS_DIR})") from e
    except yaml.YAMLError as e:
        raise MappingError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise MappingError(f"{p}: a mapping file must be a YAML mapping (key: value)")
    if kind is not None and data.get("kind") != kind:
        raise MappingError(f"{p}: field 'kind' is {data.get('kind')!r}, this importer needs {kind!r}")
    data["_path"] = str(p)
    return data


def check_timezone(value: Any, where: str) -> str:
    """A mapping's `timezone` as an IANA name, or a MappingError naming the file and key."""
    name = str(value or "UTC")
    if not is_timezone(name):
        raise MappingError(f"{where}: key 'timezone': {name!r} is not an IANA time zone "
                           "(e.g. Europe/London, UTC)")
    return name


def compile_pattern(value: Any, where: str, key: str) -> re.Pattern[str]:
    """A mapping's regular expression (with one group), or a MappingError naming file and key."""
    try:
        pat = re.compile(str(value))
    except re.error as e:
        raise MappingError(f"{where}: key {key!r}: not a valid regular expression ({e})") from None
    if pat.groups < 1:
        raise MappingError(f"{where}: key {key!r}: needs a group for the number, e.g. '_(\\d+)$'")
    return pat


def check_answers(ref: Any, answers: dict[str, Any], total: Any,
                  item_field: Callable[[str], str], total_field: str) -> None:
    """Item numbers and ranges, and the total's range, against the instrument definition.

    The ingest checks the same again; checking here names the source file, line and field, and
    keeps the import's report true ("clean" imports were rejected at ingest before).
    """
    for item, v in answers.items():
        if ref.item_count and not (item.isdigit() and 1 <= int(item) <= ref.item_count):
            raise Quarantined("unknown_item", item_field(item),
                              f"{ref.code} has items 1..{ref.item_count}")
        if v is not None and ((ref.item_min is not None and v < ref.item_min)
                              or (ref.item_max is not None and v > ref.item_max)):
            raise Quarantined("answer_out_of_range", item_field(item),
                              f"{v} outside {ref.item_min}..{ref.item_max} for {ref.code}")
    if total is not None and ((ref.total_min is not None and total < ref.total_min)
                              or (ref.total_max is not None and total > ref.total_max)):
        raise Quarantined("answer_out_of_range", total_field,
                          f"{total} outside {ref.total_min}..{ref.total_max} for {ref.code}")


def describe_value(raw: Any) -> str:
    """What a rejected cell looked like, without its content (it may hold names or notes)."""
    text = str(raw)
    kind = "text" if any(c.isalpha() for c in text) else "symbols"
    return f"a non-number ({kind}, {len(text)} characters)"


def with_clinic(mapping: dict[str, Any], clinic_id: str | None) -> dict[str, Any]:
    """The mapping with the `--clinic` / clinic_id argument in it, checked as the argument's (set
    into the mapping first, a bad value was blamed on the mapping file)."""
    if not clinic_id:
        return mapping
    return {**mapping, "clinic_id": check_clinic(clinic_id, "--clinic / clinic_id argument")}


def require(mapping: dict[str, Any], key: str) -> Any:
    """A required mapping key, or a MappingError naming the file and key."""
    if mapping.get(key) in (None, ""):
        raise MappingError(f"{mapping.get('_path', 'mapping')}: required key '{key}' is missing")
    return mapping[key]


def check_clinic(clinic_id: str, where: str) -> str:
    if not CLINIC_RE.match(str(clinic_id)):
        raise MappingError(
            f"{where}: clinic_id {clinic_id!r} must be 1-64 letters, digits, '-' or '_'"
        )
    return str(clinic_id)


def normalise_timestamp(value: Any, tz: str = "UTC") -> str | None:
    """ISO-8601 with an explicit offset; a date or naive time is read in the mapping's time zone."""
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime.combine(value, time(0))
    else:
        s = str(value).strip()
        try:
            if re.fullmatch(r"\d{4}-\d{2}-\d{2}", s):
                dt = datetime.combine(date.fromisoformat(s), time(0))
            elif re.fullmatch(r"\d{4}-\d{2}", s):  # FHIR partial dates: first of the month
                dt = datetime.combine(date.fromisoformat(s + "-01"), time(0))
            else:
                dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
        except ValueError:
            return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=ZoneInfo(tz))
    return dt.isoformat()


def number(value: Any) -> int | float | None:
    """A JSON number from a weight or score; integral floats become ints (3.0 -> 3)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        f = float(str(value).strip())
    except ValueError:
        return None
    if f != f:  # NaN
        return None
    return int(f) if f.is_integer() else f


def make_event(
    *,
    event_id: str,
    event_type: str,
    occurred_at: str,
    source: str,
    clinic_id: str,
    payload: dict[str, Any],
    patient_id: str | None = None,
    episode_id: str | None = None,
    session_id: str | None = None,
    therapist_id: str | None = None,
) -> dict[str, Any]:
    """A canonical event envelope (schemas/events.yaml); absent identifiers are left out."""
    ev: dict[str, Any] = {
        "event_id": event_id,
        "event_type": event_type,
        "schema_version": SCHEMA_VERSION,
        "occurred_at": occurred_at,
        "source": source,
        "clinic_id": clinic_id,
    }
    for k, v in (("patient_id", patient_id), ("therapist_id", therapist_id),
                 ("episode_id", episode_id), ("session_id", session_id)):
        if v not in (None, ""):
            ev[k] = str(v)
    ev["payload"] = {k: v for k, v in payload.items() if v is not None}
    return ev


@dataclass
class Quarantined(Exception):
    """A record in scope that cannot be mapped: reason code, field and a message (no content)."""

    reason: str
    field: str = ""
    message: str = ""

    def __str__(self) -> str:
        return f"{self.reason} ({self.field}): {self.message}"


@dataclass
class Skipped(Exception):
    """A record that is deliberately not imported (out of scope), with the reason."""

    reason: str


@dataclass
class FileAccount:
    """Per input file: records read and what became of each one."""

    path: str
    records_read: int = 0
    produced: int = 0  # records that produced at least one event
    events: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    quarantined: Counter[str] = field(default_factory=Counter)

    @property
    def balanced(self) -> bool:
        return self.records_read == self.produced + sum(self.skipped.values()) + sum(
            self.quarantined.values()
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "records_read": self.records_read,
            "produced_events_from": self.produced,
            "events": self.events,
            "skipped": dict(sorted(self.skipped.items())),
            "quarantined": dict(sorted(self.quarantined.items())),
            "balanced": self.balanced,
        }


@dataclass
class ImportResult:
    """What an import produced: events, quarantine entries, and the per-file accounting."""

    kind: str
    events: list[dict[str, Any]] = field(default_factory=list)
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, FileAccount] = field(default_factory=dict)
    # events not read from a record (episode.opened per patient; CSV gap sessions)
    synthesised: int = 0
    # input columns (CSV headers) that no part of the mapping reads: not imported
    unmapped_columns: list[str] = field(default_factory=list)
    # event id -> (its JSON, where it came from), for rows that repeat an id (account_csv_rows)
    seen_events: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    # Written by write_landing():
    events_path: Path | None = None
    quarantine_path: Path | None = None
    summary_path: Path | None = None

    def account(self, path: str) -> FileAccount:
        if path not in self.files:
            self.files[path] = FileAccount(path)
        return self.files[path]

    def read(self, path: str) -> None:
        self.account(path).records_read += 1

    def produce(self, path: str, events: list[dict[str, Any]]) -> None:
        acc = self.account(path)
        acc.produced += 1
        acc.events += len(events)
        self.events.extend(events)

    def skip(self, path: str, reason: str) -> None:
        self.account(path).skipped[reason] += 1

    def reject(self, path: str, line: int | str, q: Quarantined, record: str = "") -> None:
        self.account(path).quarantined[q.reason] += 1
        self.quarantine.append({
            "file": path, "line": line, "record": record,
            "reason": q.reason, "field": q.field, "message": q.message,
        })

    @property
    def balanced(self) -> bool:
        return all(a.balanced for a in self.files.values())

    def summary(self) -> dict[str, Any]:
        by_type = Counter(e["event_type"] for e in self.events)
        return {
            "kind": self.kind,
            "events": len(self.events),
            "events_by_type": dict(sorted(by_type.items())),
            "synthesised_events": self.synthesised,
            "unmapped_columns": self.unmapped_columns,
            "quarantined": len(self.quarantine),
            "balanced": self.balanced,
            "files": [a.as_dict() for a in self.files.values()],
            "identity": "records_read = produced_events_from + skipped + quarantined, per file",
        }


def dedupe_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop exact repeats of an event_id (a resource present in two exported files)."""
    seen: dict[str, str] = {}
    out = []
    for ev in events:
        blob = json.dumps(ev, sort_keys=True)
        if ev["event_id"] in seen and seen[ev["event_id"]] == blob:
            continue
        seen[ev["event_id"]] = blob
        out.append(ev)
    return out


def output_stem(kind: str, inputs: list[Path], mapping: dict[str, Any],
                key: bytes | None = None) -> str:
    """A stable file name for one import: the same inputs and mapping give the same file.

    `<kind>-<clinic>-<keyed hash of the input paths and the mapping>`. The input's own name is left
    out: the landing file's name is stored with every event (raw.events.source_file) and shown in
    logs, and an export may be named after a patient (`mrn-483920.csv`); the import's summary (in
    the quarantine folder, outside the warehouse) names the inputs. The hash is an HMAC under the
    platform key (default `platform_key()`), as the event ids are: an unkeyed hash of a path gave
    the patient number in it back to anyone who tried the numbers.
    """
    if key is None:
        from alliance.pseudonyms import platform_key

        key = platform_key()
    h = hmac.new(key, b"landing-file|", hashlib.sha256)
    for p in sorted(str(x.resolve()) for x in inputs):
        h.update(p.encode())
    h.update(json.dumps({k: v for k, v in mapping.items() if k != "_path"},
                        sort_keys=True, default=str).encode())
    clinic = str(mapping.get("clinic_id") or "")
    middle = f"{clinic}-" if CLINIC_RE.match(clinic) else ""
    return f"{kind}-{middle}{h.hexdigest()[:16]}"


def _atomic_write(path: Path, text: str) -> None:
    # Write beside the target and rename: a landing sensor never sees a half-written file.
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def report_dir(out_dir: Path) -> Path:
    """Where an import's quarantine and summary files go for events written to `out_dir`.

    They name source records (FHIR resource ids, CSV rows), so they do not belong in landing/:
    when `out_dir` is inside the data directory they go to its quarantine folder
    (`alliance.config.paths().quarantine`, next to the ingest's rejected lines); an explicit
    output folder elsewhere keeps them beside the events, where the caller chose to write.
    """
    data = paths()
    out = Path(out_dir).resolve()
    if out == data.root or data.root in out.parents:
        return data.quarantine
    return out


def check_mapped_values(events: list[dict[str, Any]]) -> None:
    """Refuse an import whose events the ingest would reject for a value the mapping set.

    The values a mapping (or its defaults) puts into every event: the event type a status maps
    to, `source`, and the payload's enum fields (respondent, timing, age group, modality, ...) and
    instrument version. A wrong one (a typo in the mapping) would have every event quarantined at
    ingest after a clean-looking import. Values read from the records are checked per record by
    the importers; this names the field, the allowed values and how many events, never a value.
    """
    from alliance.contract import load_contract
    from alliance.instruments import load_instruments

    contract = load_contract()
    source_re = contract.envelope["source"].pattern
    versions = {(i.code, i.version) for i in load_instruments().values()}
    problems: Counter[str] = Counter()
    for e in events:
        et = contract.event_types.get(str(e.get("event_type")))
        if et is None:
            problems[f"event_type is not one of the contract's event types ({', '.join(contract.event_types)})"] += 1
            continue
        if source_re and not re.fullmatch(source_re, str(e.get("source", ""))):
            problems[f"source does not match {source_re}"] += 1
        payload = e.get("payload") or {}
        for name, spec in et.payload.items():
            value = payload.get(name)
            if spec.type == "enum" and value is not None and value not in spec.values:
                problems[f"payload.{name} of {et.name} is not one of {', '.join(spec.values)}"] += 1
        if "instrument" in payload and (payload.get("instrument"),
                                        payload.get("instrument_version")) not in versions:
            problems[f"payload.instrument_version is not defined in schemas/instruments for "
                     f"{payload.get('instrument')}"] += 1
    if problems:
        raise MappingError("the ingest would reject events for values the mapping sets (nothing was "
                           "written; check the mapping's keys for these fields): "
                           + "; ".join(f"{p} ({n} events)" for p, n in problems.most_common()))


def write_landing(result: ImportResult, out_dir: Path, stem: str,
                  reports_dir: Path | None = None) -> ImportResult:
    """Write events as `<out_dir>/<stem>.ndjson`; `<stem>.quarantine.tsv` and `<stem>.summary.json`
    go to `reports_dir` (default: :func:`report_dir`, the data directory's quarantine folder).

    Only the `.ndjson` file is canonical input for the ingest; the other two are for people.
    Events are written in a stable order so re-importing the same input gives a byte-identical
    file (the ingest then sees the same sha256 and does nothing).
    """
    if not result.balanced:
        bad = [a.as_dict() for a in result.files.values() if not a.balanced]
        raise AssertionError(f"import accounting does not balance: {bad}")
    check_mapped_values(result.events)
    out_dir.mkdir(parents=True, exist_ok=True)
    events = sorted(dedupe_events(result.events), key=lambda e: (e["occurred_at"], e["event_id"]))
    lines = "".join(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n" for e in events)
    result.events_path = out_dir / f"{stem}.ndjson"
    _atomic_write(result.events_path, lines)

    reports = Path(reports_dir) if reports_dir is not None else report_dir(out_dir)
    reports.mkdir(parents=True, exist_ok=True)
    result.quarantine_path = reports / f"{stem}.quarantine.tsv"
    cols = ["file", "line", "record", "reason", "field", "message"]
    rows = ["\t".join(cols)]
    for q in result.quarantine:
        rows.append("\t".join(str(q[c]).replace("\t", " ").replace("\n", " ") for c in cols))
    _atomic_write(result.quarantine_path, "\n".join(rows) + "\n")

    result.summary_path = reports / f"{stem}.summary.json"
    summary = result.summary() | {"events_written": len(events),
                                  "events_file": str(result.events_path)}
    _atomic_write(result.summary_path, json.dumps(summary, indent=2) + "\n")
    return result


def read_csv_rows(
    path: Path, delimiter: str = ","
) -> tuple[list[str], list[tuple[int, dict[str, str] | None]]]:
    """CSV rows with their line numbers (header = line 1); a row of the wrong width is None.

    Blank lines come back as an empty dict so callers can account for them as skipped. A file that
    cannot be read as a whole raises InputFileError naming the file (and line): a header that
    names a column twice (its values would silently overwrite the first's), text that is not
    UTF-8, a row the CSV reader refuses, a folder.
    """
    if path.is_dir():
        raise InputFileError(f"{path}: is a folder, not a CSV file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bad_line = raw[:e.start].count(b"\n") + 1
        raise InputFileError(f"{path}: line {bad_line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                             "export the file as UTF-8") from e
    line = 1
    try:
        with io.StringIO(text, newline="") as f:
            reader = csv.reader(f, delimiter=delimiter)
            try:
                header = [h.strip() for h in next(reader)]
            except StopIteration:
                return [], []
            # (blank names are unnamed columns of a spreadsheet export, not a repeat)
            repeated = sorted({h for h in header if h and header.count(h) > 1})
            if repeated:
                raise InputFileError(
                    f"{path}: line 1: the header names column(s) {', '.join(map(repr, repeated))} "
                    "more than once; which column's values count would be arbitrary")
            rows: list[tuple[int, dict[str, str] | None]] = []
            for values in reader:
                line = reader.line_num
                if not values or all(not v.strip() for v in values):
                    rows.append((line, {}))
                elif len(values) != len(header):
                    rows.append((line, None))
                else:
                    rows.append((line, dict(zip(header, values, strict=True))))
    except csv.Error as e:
        raise InputFileError(f"{path}: line {line + 1}: not readable as CSV ({e})") from e
    return header, rows


def account_csv_rows(
    result: ImportResult, path: Path, header: list[str],
    rows: list[tuple[int, dict[str, str] | None]],
    row_events: Callable[[dict[str, str]], list[dict[str, Any]]], nothing_reason: str,
) -> None:
    """Turn `read_csv_rows` output into events, accounting for every row of the file.

    Blank lines are skipped, rows of the wrong width and rows `row_events` rejects (raising
    Quarantined) are quarantined with their line, and a row that yields no event is skipped for
    `nothing_reason`: records read = produced + skipped + quarantined.
    """
    where = str(path)
    result.account(where)
    for line, row in rows:
        result.read(where)
        if row == {}:
            result.skip(where, "blank line")
            continue
        if row is None:
            result.reject(where, line, Quarantined("wrong_column_count", "",
                                                   f"row does not have {len(header)} columns"))
            continue
        try:
            events = row_events(row)
            _check_repeats(result, events, where, line)
        except Quarantined as q:
            result.reject(where, line, q, f"row {line}")
            continue
        if events:
            result.produce(where, events)
        else:
            result.skip(where, nothing_reason)


def _check_repeats(result: ImportResult, events: list[dict[str, Any]], where: str,
                   line: int) -> None:
    """A row whose event repeats an earlier row's id (same record and time point) with other
    content conflicts with it: quarantined here, naming both lines, instead of at ingest as a
    conflicting duplicate naming only the landing file. Exact repeats pass (dropped on write)."""
    blobs = [(ev["event_id"], json.dumps(ev, sort_keys=True)) for ev in events]
    for eid, blob in blobs:
        seen = result.seen_events.get(eid)
        if seen is not None and seen[0] != blob:
            raise Quarantined("conflicting_duplicate", "",
                              f"same record and time point as {seen[1]}, with other values")
    for eid, blob in blobs:
        result.seen_events.setdefault(eid, (blob, f"{Path(where).name} line {line}"))


MISSING = {"", "na", "n/a", "nan", "null", "none", "."}


def is_missing(value: Any, extra: set[str] | frozenset[str] = frozenset()) -> bool:
    return value is None or str(value).strip().lower() in MISSING | {x.lower() for x in extra}
