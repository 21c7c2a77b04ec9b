"""Ingest canonical NDJSON export files into the append-only event log (raw.events).

Every non-blank line of every file ends in exactly one place: accepted into ``raw.events``, skipped
as an exact duplicate of an event already logged, or quarantined with a reason. The identity
``lines_read = accepted + duplicates + quarantined`` is recorded per file in
``raw.ingested_files`` and checked before commit.

Validation runs as set-based DuckDB SQL generated from the event contract (schemas/events.yaml) and
the instrument definitions, so a million lines cost a few seconds instead of a Python loop.
Identifiers are replaced by keyed pseudonyms before anything is written. A group of files is
written in one transaction together with its manifest rows: a crash leaves no partial file behind
and a re-run finishes the work exactly once.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import json
import queue
import re
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from alliance.contract import ID_FIELDS, Contract, FieldSpec, load_contract
from alliance.pseudonyms import DIGEST_CHARS, PREFIX, hmac_pads

LANDING_SUFFIXES = (".ndjson", ".jsonl", ".ndjson.gz", ".jsonl.gz")
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".writing")
QUESTIONNAIRE_TYPES = ("questionnaire.submitted", "questionnaire.amended")
# The offset is -23:59..+23:59 (an hour of 25 or minutes of 99 parsed and shifted the time).
# Years 0001-9999 and times 00:00:00-23:59:59, as FHIR's dateTime allows: DuckDB reads year 0000
# as 1 BC and 24:00:00 as the next day's midnight, so both were accepted and stored as another
# time than the one sent. (Calendar validity, e.g. 30 February, is the cast's.)
YEAR_RE = r"(\d{3}[1-9]|\d{2}[1-9]0|\d[1-9]00|[1-9]000)"
# Seconds are required: DuckDB's cast reads no time without them (the line failed the cast).
TIMESTAMP_RE = (rf"^{YEAR_RE}-\d{{2}}-\d{{2}}[T ]([01]\d|2[0-3]):[0-5]\d:[0-5]\d(\.\d{{1,9}})?"
                r"(Z|[+-]([01]\d|2[0-3])(:?[0-5]\d)?)$")
DATE_RE = rf"^{YEAR_RE}-\d{{2}}-\d{{2}}$"
# An integer short enough to repeat in raw.quarantine (a long one could be an identifier sent in
# the wrong field): the redacted copy and the unsupported-version message use the same rule.
SHORT_INTEGER_RE = r"-?[0-9]{1,4}"
# An identifier that starts or ends with whitespace (any Unicode space) or holds a control or
# invisible character: it looks like another identifier but pseudonymises to another patient, so
# it is rejected, never trimmed. RE2: \s is ASCII whitespace, \p{Z} the Unicode separators,
# \p{Cc} controls, \p{Cf} formats (zero-width space and joiners, byte order mark, direction
# marks); then the blank letters and marks that are no format character: combining grapheme
# joiner U+034F, Hangul fillers U+115F, U+1160, U+3164, U+FFA0, Braille blank U+2800, variation
# selectors U+FE00-FE0F. (Letters in another Unicode normal form, e.g. a decomposed accent, are
# not caught: identifiers are compared as sent.)
ODD_ID_RE = (r"^[\s\p{Z}]|[\s\p{Z}]$"
             r"|[\p{Cc}\p{Cf}\x{034F}\x{115F}\x{1160}\x{2800}\x{3164}\x{FFA0}\x{FE00}-\x{FE0F}]")
# A comma before '}' or ']' outside strings (from the start: any run of non-quote characters and
# whole strings, then the comma).
TRAILING_COMMA_RE = r'^(?:[^"]|"(?:[^"\\]|\\.)*")*,[ \t\r\n]*[}\]]'
TRAILING_CANDIDATE_RE = r",[ \t\r\n]*[}\]]"  # the same anywhere, strings included
# Lines validated together (a group of whole files): bounds peak memory while keeping the
# per-group work (a dozen statements, each with a start and a tail where one core waits) small.
# Measured at 10^6 events (ninth session, plain ingest, alternating runs): 170k lines 9.2 s,
# 250k 8.1-8.6 s and 1.48 GB peak RSS, 330k 1.56 GB, 400k 7.9 s, 500k 7.8 s and 1.69 GB.
MAX_LINES_PER_GROUP = 500_000
# Lines committed together (whole groups): the groups' rows are staged in temporary tables and
# written to the log by one insert per transaction. One large insert writes full row groups;
# one insert per (then) 250k-line group left partly filled ones that every commit and checkpoint merged
# again (about 1.5 s per million lines). The staging costs about 0.4 GB per million lines.
MAX_LINES_PER_TRANSACTION = 1_000_000

# raw.events names each column's compression: the one DuckDB's analysis picks for it anyway
# (random hex and UUIDs: FSST; pseudonyms and codes: dictionary; numbers: RLE or bit-packing),
# so the checkpoint does not analyse every candidate method on every segment first. That
# analysis was a fifth of the log insert's CPU (2.2-2.4 against 1.6-1.7 CPU s per million
# events), for the same file size. A segment the named method cannot hold is stored
# uncompressed. (Warehouses created before keep DuckDB's automatic choice; so does a file of
# storage version v1.3.0 or later, where FSST and dictionary are only read: ensure_raw_schema.)
RAW_DDL = """
create schema if not exists raw;
create table if not exists raw.ingested_files (
    file_id bigint primary key,
    path varchar not null,
    file_name varchar not null,
    sha256 varchar not null,
    bytes bigint not null,
    lines_read bigint not null,
    blank_lines bigint not null,
    accepted bigint not null,
    duplicates bigint not null,
    quarantined bigint not null,
    dropped_fields bigint not null,
    status varchar not null,
    error varchar,
    started_at timestamptz not null,
    finished_at timestamptz not null,
    recorded_at timestamptz not null
);
create table if not exists raw.events (
    event_id varchar not null using compression fsst,
    content_hash varchar not null using compression fsst,
    event_type varchar not null using compression dictionary,
    schema_version integer not null using compression rle,
    occurred_at timestamptz not null using compression bitpacking,
    recorded_at timestamptz not null using compression rle,
    source varchar not null using compression dictionary,
    clinic_id varchar not null using compression dictionary,
    patient_id varchar using compression dictionary,
    therapist_id varchar using compression dictionary,
    episode_id varchar using compression dictionary,
    session_id varchar using compression dictionary,
    payload json not null using compression fsst,
    file_id bigint not null using compression rle,
    source_file varchar not null using compression dictionary,
    line_number bigint not null using compression bitpacking,
    dropped_fields integer not null using compression rle
);
create table if not exists raw.quarantine (
    file_id bigint not null,
    source_file varchar not null,
    line_number bigint not null,
    reason_code varchar not null,
    field varchar,
    message varchar not null,
    event_id varchar,
    event_type varchar,
    clinic_id varchar,
    line_sha256 varchar not null,
    line_redacted json,
    recorded_at timestamptz not null,
    primary key (file_id, line_number)
);
"""

TABLE_COMMENTS = {
    "raw.events": "Append-only event log: every accepted event, identifiers pseudonymised, payload "
    "allow-listed. Never updated or deleted; every later table is a projection of it.",
    "raw.ingested_files": "Manifest of ingested files: one row per distinct file content (sha256) "
    "with its line accounting (lines_read = accepted + duplicates + quarantined).",
    "raw.quarantine": "Every rejected line with file, line number, reason and a redacted copy; the "
    "verbatim line is kept outside the warehouse in <data>/quarantine/<sha256>.ndjson.",
}
COLUMN_COMMENTS = {
    "raw.events": {
        "event_id": "Producer's unique event id (UUID or producer key).",
        "content_hash": "md5 of the source line: tells exact duplicates (same event_id, same bytes) from conflicts.",
        "event_type": "Event type from the contract (schemas/events.yaml).",
        "schema_version": "Version of the event type's payload schema.",
        "occurred_at": "When it happened, from the source.",
        "recorded_at": "When the platform learned it (ingest transaction time); as-of rebuilds cut here.",
        "source": "Producing system.",
        "clinic_id": "Clinic identifier (organisations are not pseudonymised).",
        "patient_id": "Patient pseudonym (pt_ + HMAC-SHA256 prefix).",
        "therapist_id": "Therapist pseudonym (th_...).",
        "episode_id": "Episode pseudonym (ep_...).",
        "session_id": "Session pseudonym (se_...).",
        "payload": "Type-specific fields; only the contract's allow-listed fields are kept.",
        "file_id": "raw.ingested_files.file_id of the file it came from.",
        "source_file": "Name of the file it came from.",
        "line_number": "1-based line number in that file.",
        "dropped_fields": "Number of fields dropped because they are not in the contract (free text).",
    },
    "raw.ingested_files": {
        "file_id": "Identifier of the file's content in this warehouse (raw.events.file_id).",
        "path": "Path the file was read from.",
        "file_name": "File name (events and quarantine rows carry it as source_file).",
        "sha256": "sha256 of the file's bytes: the same content is never ingested twice.",
        "bytes": "Size of the file in bytes.",
        "lines_read": "Non-blank lines read; = accepted + duplicates + quarantined.",
        "blank_lines": "Blank lines (ignored).",
        "accepted": "Lines appended to raw.events.",
        "duplicates": "Lines skipped as exact duplicates of an event already logged.",
        "quarantined": "Lines rejected to raw.quarantine.",
        "dropped_fields": "Payload fields dropped because the contract does not allow them (free text).",
        "status": "ingested, or unreadable (the file could not be decompressed).",
        "error": "Why an unreadable file could not be read.",
        "started_at": "When processing of the file's group started.",
        "finished_at": "When its manifest row was written.",
        "recorded_at": "Transaction time, the recorded_at of its events.",
    },
    "raw.quarantine": {
        "file_id": "raw.ingested_files.file_id of the file.",
        "source_file": "Name of the file.",
        "line_number": "1-based line number in the file.",
        "event_id": "The line's event_id when it had one.",
        "event_type": "The line's event_type when it had one.",
        "clinic_id": "The line's clinic_id when it had one.",
        "recorded_at": "When the line was rejected.",
        "reason_code": "Why the line was rejected (codes in schemas/events.yaml quarantine_reasons).",
        "field": "The offending field (dotted path), when there is one.",
        "message": "Human-readable explanation naming file, line and field.",
        "line_sha256": "sha256 of the verbatim line (kept outside the warehouse).",
        "line_redacted": "Envelope of the line with identifiers pseudonymised, values only where they pass their field's checks (no free text), the contract's payload keys (others counted) and no payload values; NULL when unparseable.",
    },
}


class IngestError(RuntimeError):
    """A file could not be ingested; the message names the file and what to do."""


@dataclass
class FileResult:
    """The accounting of one file."""

    path: str
    sha256: str
    status: str  # ingested | already_ingested | unreadable | vanished (gone before it was read)
    file_id: int | None = None
    lines_read: int = 0
    blank_lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    dropped_fields: int = 0
    error: str | None = None
    quarantine_reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def ensure_raw_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create the raw schema and its tables if missing, and write the documentation that differs.

    Every ingest calls this: one catalog read decides, so an up-to-date warehouse gets no DDL
    and no COMMENT ON (about 80 catalog writes, 0.1-0.2 s per ingest before).
    """
    from alliance.rejections import ensure_rejections_table

    tables = {f"raw.{t}": c for t, c in con.execute(
        "select table_name, comment from duckdb_tables() "
        "where database_name = current_database() and schema_name = 'raw'").fetchall()}
    if not all(t in tables for t in TABLE_COMMENTS):
        try:
            con.execute(RAW_DDL)
        except duckdb.BinderException as e:
            # "Can't compress using user-provided compression type 'FSST', that type is
            # deprecated": a file of a newer storage version. DuckDB chooses (every statement
            # of RAW_DDL is "if not exists", so the ones that ran are not repeated).
            if "compress" not in str(e):
                raise
            con.execute(re.sub(r" using compression \w+", "", RAW_DDL))
    ensure_rejections_table(con)
    columns = {(f"raw.{t}", c): doc for t, c, doc in con.execute(
        "select table_name, column_name, comment from duckdb_columns() "
        "where database_name = current_database() and schema_name = 'raw'").fetchall()}
    for table, comment in TABLE_COMMENTS.items():
        if tables.get(table) != comment:
            con.execute(f"comment on table {table} is '{_sq(comment)}'")
    for table, cols in COLUMN_COMMENTS.items():
        for col, comment in cols.items():
            if columns.get((table, col)) != comment:
                con.execute(f"comment on column {table}.{col} is '{_sq(comment)}'")


def landing_files(landing: Path) -> list[Path]:
    """Files in the landing folder that look complete (no temporary suffix), oldest name first."""
    if not landing.exists():
        return []
    out = []
    for p in sorted(landing.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name.endswith(TEMP_SUFFIXES):
            continue
        if p.name.endswith(LANDING_SUFFIXES):
            out.append(p)
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- SQL generation


def _sq(s: str) -> str:
    return s.replace("'", "''")


def _lit(s: str) -> str:
    return f"'{_sq(s)}'"


def _list_lit(items: Iterable[str]) -> str:
    return "[" + ", ".join(_lit(i) for i in items) + "]::varchar[]"


def _json_path(key: str) -> str:
    """SQL literal of the JSONPath of one top-level key."""
    return _lit('$."' + key + '"')


def _col(name: str, prefix: str) -> str:
    return f"{prefix}{name.replace('.', '_')}"


STRING_TYPES = ("string", "timestamp", "date", "enum")  # JSON strings in the contract
# JSON type codes: the code point of a JSON text's first character (integers compare faster
# than one-character strings, and a million lines have 29 of them each).
JT_STRING, JT_OBJECT, JT_ARRAY, JT_TRUE, JT_FALSE = 34, 123, 91, 116, 102  # " { [ t f


def _jt_number(jt: str) -> str:
    """SQL true when type code `jt` starts a JSON number ('-' or a digit)."""
    return f"({jt} between 48 and 57 or {jt} = 45)"


def _type_violation(name: str, spec: FieldSpec) -> str | None:
    """SQL true when a present, non-null value has the wrong JSON type (over jt_<name>, sv_<name>)."""
    jt = f"jt_{name}"
    t = spec.type
    if t in STRING_TYPES:
        return f"{jt} <> {JT_STRING}"
    if t == "integer":
        return f"(not {_jt_number(jt)} or regexp_matches(sv_{name}, '[.eE]'))"
    if t == "number":
        return f"not {_jt_number(jt)}"
    if t == "boolean":
        return f"{jt} not in ({JT_TRUE}, {JT_FALSE})"
    if t == "object":
        return f"{jt} <> {JT_OBJECT}"
    return None


def _value_violation(name: str, spec: FieldSpec) -> tuple[str, str] | None:
    """(SQL true when a value of the right type is not allowed, message SQL), over sv_<name>."""
    s = f"sv_{name}"
    if spec.type == "timestamp":
        return (
            f"not regexp_full_match({s}, {_lit(TIMESTAMP_RE)}) or try_cast({s} as timestamptz) is null",
            _lit("is not an ISO-8601 timestamp with a UTC offset (e.g. 2026-03-02T09:00:00+01:00)"),
        )
    if spec.type == "date":
        return (
            f"not regexp_full_match({s}, {_lit(DATE_RE)}) or try_cast({s} as date) is null",
            _lit("is not a date YYYY-MM-DD"),
        )
    if spec.type == "enum":
        return (
            f"not list_contains({_list_lit(spec.values)}, {s})",
            _lit(f"is not one of {', '.join(spec.values)}"),
        )
    if spec.pattern:
        return (
            f"not regexp_full_match({s}, {_lit(spec.pattern)})",
            _lit(f"does not match {spec.pattern}"),
        )
    if spec.type in ("integer", "number") and (spec.minimum is not None or spec.maximum is not None):
        lo = spec.minimum if spec.minimum is not None else "-infinity"
        hi = spec.maximum if spec.maximum is not None else "infinity"
        return (
            f"not (try_cast({s} as double) between '{lo}'::double and '{hi}'::double)",
            _lit(f"is outside {spec.minimum}..{spec.maximum}"),
        )
    return None


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _json_type_sql(ref: str) -> str:
    """SQL for a JSON text's type code: its first character's code point (json_transform writes
    JSON minified).

    JT_STRING, JT_OBJECT, JT_ARRAY, JT_TRUE/JT_FALSE, a digit or '-' (`_jt_number`). JSON null
    comes out of json_transform as SQL NULL, the same as a missing key: both are "missing" to the
    rules.
    """
    return f"ascii({ref}::varchar)"


def _type_name_sql(jt: str, sv: str) -> str:
    """SQL naming a type code's JSON type for messages (varchar, object, bigint, ...)."""
    return (f"(case {jt} when {JT_STRING} then 'varchar' when {JT_OBJECT} then 'object' "
            f"when {JT_ARRAY} then 'array' when {JT_TRUE} then 'boolean' "
            f"when {JT_FALSE} then 'boolean' else case when "
            f"regexp_matches({sv}, '[.eE]') then 'double' else 'bigint' end end)")


def _json_text_sql(ref: str) -> str:
    """SQL for a JSON text's value as text (json_extract_string): strings unquoted, else as is."""
    # Without escapes the quotes are cut off by substr (cheaper than a [2:-2] slice: about 0.3
    # CPU seconds per million lines over the contract's string fields); escapes need the decoder.
    # (has_esc: whether the line holds a backslash at all, one search per line instead of one
    # per field: 0.2 CPU s per million lines)
    return (f"case when ascii({ref}::varchar) = {JT_STRING} then case when has_esc "
            f"then json_extract_string({ref}, '$') else substr({ref}::varchar, 2, length({ref}::varchar) - 2) end "
            f"else {ref}::varchar end")


def _echo_sql(contract: Contract) -> dict[str, str]:
    """SQL (over _checked c) of the envelope values a quarantine row may repeat.

    A rejected line may carry free text or a raw identifier in any field, and raw.quarantine is
    in the warehouse. A value is repeated only when it passes its own field's checks, which leave
    no room for free text: the known event types, a timestamp, an integer, the field's pattern.
    Any other value, and a string field without a pattern, is NULL (the verbatim line is in the
    quarantine file outside the warehouse). Payload keys: only the contract's names are listed,
    the others counted.
    """
    env = contract.envelope
    cols = {"event_id": "c.event_id", "event_type": "c.event_type", "clinic_id": "c.clinic_id",
            "schema_version": "c.sv_e_schema_version", "occurred_at": "c.sv_e_occurred_at",
            "source": "c.sv_e_source"}
    out: dict[str, str] = {}
    for name, v in cols.items():
        spec = env.get(name)
        if name == "event_type":
            cond = f"list_contains({_list_lit(contract.event_types)}, {v})"
        elif spec is None:
            cond = None
        elif spec.type == "timestamp":
            cond = f"regexp_full_match({v}, {_lit(TIMESTAMP_RE)})"
        elif spec.type == "integer":
            cond = f"regexp_full_match({v}, {_lit(SHORT_INTEGER_RE)})"
        elif spec.pattern:
            cond = f"regexp_full_match({v}, {_lit(spec.pattern)})"
        else:
            cond = None
        out[name] = f"(case when {cond} then {v} end)" if cond else "null::varchar"
    names = sorted({n for et in contract.event_types.values() for n in et.payload})
    out["payload_keys"] = _list_lit(names)
    return out


def _validation_sql(contract: Contract) -> list[str]:
    """Statements that turn _lines into _checked: envelope extracted, first violation named.

    Each line is parsed once into typed columns (jt_* = JSON type code, sv_* = value as text)
    that the rules compare in the same pipeline, which keeps a million lines to seconds.
    """
    env = contract.envelope
    env_names = list(env)
    payload_fields: dict[str, FieldSpec] = {}
    for et in contract.event_types.values():
        for name, spec in et.payload.items():
            payload_fields.setdefault(name, spec)
    pay_names = list(payload_fields)

    # (condition, reason_code, field, message-sql) in precedence order; the first true one wins.
    # Type-specific rules go to typed_rules so a line is only tested against its own type's rules.
    typed_rules: dict[str, list[tuple[str, str, str, str]]] = {t: [] for t in contract.event_types}
    rules: list[tuple[str, str, str, str]] = [
        ("not is_json", "malformed_json", "", _lit("is not valid JSON")),
        ("trailing_comma", "malformed_json", "",
         _lit("is not valid JSON (a comma before a closing brace or bracket)")),
        ("not is_object", "not_an_object", "", _lit("is JSON but not an object")),
    ]

    def missing(n: str) -> str:
        return f"jt_{n} is null"

    def present(n: str) -> str:
        return f"jt_{n} is not null"

    def got(n: str) -> str:
        return f" || {_type_name_sql(f'jt_{n}', f'sv_{n}')}"

    for name, spec in env.items():
        n = _col(name, "e_")
        if spec.required:
            rules.append((missing(n), "missing_field", name, _lit("is required but missing")))
        tv = _type_violation(n, spec)
        if tv:
            rules.append((f"{present(n)} and {tv}", "wrong_type", name,
                          _lit(f"must be a JSON {spec.type}, got ") + got(n)))
    types = list(contract.event_types)
    # (the unknown value itself is not repeated: it could be free text; the verbatim line is in
    # the quarantine file outside the warehouse)
    # (type_idx: the event type's position in `types`, NULL when unknown; the rules compare
    # integers instead of up to ten strings per line)
    rules.append(("type_idx is null", "unknown_event_type",
                  "event_type", _lit("is not one of the contract's event types")))
    # (coalesce: an integer beyond bigint casts to NULL, and a NULL here passed the rule; the
    # log's integer cast then stopped the whole ingest)
    # The event type is known here; one test per distinct list of supported versions.
    by_versions: dict[tuple[int, ...], list[int]] = {}
    for i, et in enumerate(contract.event_types.values()):
        by_versions.setdefault(tuple(et.schema_versions), []).append(i + 1)
    version_tests = {v: f"coalesce(list_contains([{', '.join(map(str, v))}], "
                        f"try_cast(sv_e_schema_version as bigint)), false)" for v in by_versions}
    version_ok = (next(iter(version_tests.values())) if len(version_tests) == 1 else
                  "case " + " ".join(f"when type_idx in ({', '.join(map(str, idx))}) then {version_tests[v]}"
                                     for v, idx in by_versions.items()) + " else false end")
    # (the version is repeated only when short: a long number could be an identifier)
    rules.append((f"not ({version_ok})",
                  "unsupported_schema_version", "schema_version",
                  f"case when regexp_full_match(sv_e_schema_version, {_lit(SHORT_INTEGER_RE)}) then "
                  f"{_lit('version ')} || sv_e_schema_version || {_lit(' is not supported for ')} "
                  f"else {_lit('this version is not supported for ')} end || sv_e_event_type"))
    for name, spec in env.items():
        n = _col(name, "e_")
        vv = _value_violation(n, spec)
        if vv:
            rules.append((f"{present(n)} and ({vv[0]})", "invalid_value", name, vv[1]))
        if name in ID_FIELDS:
            # (odd_*: a cheap test on the JSON text that rules out nearly every line; only the
            # rest are searched with the expression)
            rules.append((f"odd_{n} and jt_{n} = {JT_STRING} and regexp_matches(sv_{n}, {_lit(ODD_ID_RE)})",
                          "invalid_value", name,
                          _lit("starts or ends with whitespace or holds an invisible or control "
                               "character: identifiers are compared exactly, so it would name "
                               "another patient, therapist, episode or session")))
    for tname, et in contract.event_types.items():
        tr = typed_rules[tname]
        for req in et.requires:
            tr.append((missing(_col(req, "e_")), "missing_field", req,
                       _lit(f"is required for {tname} but missing")))
        for pname, spec in et.payload.items():
            n = _col(pname, "p_")
            fname = f"payload.{pname}"
            if spec.required:
                tr.append((missing(n), "missing_field", fname,
                           _lit(f"is required for {tname} but missing")))
            tv = _type_violation(n, spec)
            if tv:
                tr.append((f"{present(n)} and {tv}", "wrong_type", fname,
                           _lit(f"must be a JSON {spec.type}, got ") + got(n)))
            vv = _value_violation(n, spec)
            if vv:
                tr.append((f"{present(n)} and ({vv[0]})", "invalid_value", fname, vv[1]))
        if tname in QUESTIONNAIRE_TYPES:
            # An empty answers object holds no answer: it counts as missing (minified by
            # json_transform, so '{ }' arrives as '{}').
            # An answers object whose every answer is null holds no answer either (a null is a
            # missing item); the regex runs only on the rare objects with a null in them.
            all_null = ("case when contains(sv_p_answers, ':null') then regexp_replace("
                        "sv_p_answers, '\"(?:[^\"\\\\]|\\\\.)*\":null,?', '', 'g') = '{}' "
                        "else false end")
            tr.append((f"({missing('p_answers')} or sv_p_answers = '{{}}' or {all_null}) "
                       f"and {missing('p_total')}",
                       "missing_answers", "payload.answers",
                       _lit("and payload.total are both missing (or answers is empty or all null): one is required")))

    generic = len(rules)
    per_type = []
    for tname, tr in typed_rules.items():
        if not tr:
            continue
        whens = []
        for c, r, f, m in tr:
            rules.append((c, r, f, m))
            whens.append(f"when {c} then {len(rules)}")
        per_type.append(f"when {types.index(tname) + 1} then case {' '.join(whens)} end")
    rule_idx = "case " + " ".join(
        f"when {c} then {i + 1}" for i, (c, _, _, _) in enumerate(rules[:generic])
    ) + f" else case type_idx {' '.join(per_type)} end end"
    reasons = _list_lit(r for _, r, _, _ in rules)
    fields = _list_lit(f for _, _, f, _ in rules)
    message = "case rule_idx " + " ".join(
        f"when {i + 1} then " + (f"{_lit('field ' + repr(f) + ' ')} || {m}" if f else m)
        for i, (_, _, f, m) in enumerate(rules)
    ) + " end"
    # (allowed and kept are read over _ruled, where the event type's text is event_type)
    allowed = "case event_type " + " ".join(
        f"when {_lit(n)} then {_list_lit(et.payload)}" for n, et in contract.event_types.items()
    ) + " else []::varchar[] end"
    # Rebuild the payload from allow-listed fields only where it has others (merge_patch drops
    # the absent, null ones); most payloads are kept as they are.
    kept = "case event_type " + " ".join(
        f"when {_lit(n)} then "
        + (("json_merge_patch('{}', json_object(" + ", ".join(
            f"{_lit(k)}, json_extract(e_payload, {_json_path(k)})" for k in et.payload)
            + "))") if et.payload else "'{}'::json")
        for n, et in contract.event_types.items()
    ) + " end"
    # One JSON parse per line: json_transform maps the envelope's keys (and then the payload's) to
    # JSON text, and each field's JSON type and text value are read off that text. json_valid
    # gates the transform instead of try(): an error inside try() makes DuckDB re-evaluate the
    # whole vector row by row, and nearly every vector holds a malformed line.
    env_spec = json.dumps({n: "JSON" for n in env_names})
    pay_spec = json.dumps({n: "JSON" for n in pay_names})
    # Text values: strings unquoted. Payload fields of other types keep their JSON text (a
    # number's text is its value; they are read only once their type is right); envelope
    # fields are always unquoted, as the redacted quarantine copy shows them.
    # An identifier that is an empty or blank string is missing, as if absent: pseudonymised, it
    # merged every blank-id event of a clinic into one patient or episode. (A CASE in steps: the
    # trim, 0.1 CPU s per field and million lines, runs only for a value starting with a space.)
    def id_type(ref: str) -> str:
        t = f"{ref}::varchar"
        return (f"case when {t} = '\"\"' then null when not prefix({t}, '\" ') "
                f"then {_json_type_sql(ref)} when trim({t}, '\" ') = '' then null "
                f"else {_json_type_sql(ref)} end")

    def id_odd(ref: str) -> str:
        """SQL true unless the identifier's JSON text is plain: no space after the opening or
        before the closing quote, on a line without escapes, DEL or characters beyond ASCII
        (odd_line: one test per line is cheaper than three per identifier)."""
        t = f"{ref}::varchar"
        return f"(odd_line or prefix({t}, '\" ') or suffix({t}, ' \"'))"

    typed = ",\n            ".join(
        (f"{id_type(ref)} as jt_{c}, " if c.removeprefix("e_") in ID_FIELDS
         else f"{_json_type_sql(ref)} as jt_{c}, ")
        + (f"{_json_text_sql(ref)}" if string else f"{ref}::varchar")
        + f" as sv_{c}"
        + (f", {id_odd(ref)} as odd_{c}" if c.removeprefix("e_") in ID_FIELDS else "")
        for ref, c, string in [(f"e.{_ident(n)}", _col(n, "e_"), True) for n in env_names]
        + [(f"p.{_ident(n)}", _col(n, "p_"), payload_fields[n].type in STRING_TYPES)
           for n in pay_names])

    # Whether a payload holds nothing but allow-listed keys, without listing its keys (json_keys
    # parses the payload again, a fifth of the parse's cost): the minified payload text is exactly
    # '{' + ('"key":value' + ',') per key with the last ',' read as '}', so if the allow-listed
    # keys present account for every byte of it, there is no other key. Any other shape (another
    # key, a duplicate, an allow-listed key set to null, an escaped event_type) comes out false and
    # the keys are listed after all; it can never come out true for a payload with another key.
    plain_cases = " ".join(
        f"when {_lit(json.dumps(n))} then 1"
        + "".join(f" + coalesce({len(k) + 4} + strlen(p.{_ident(k)}::varchar), 0)" for k in et.payload)
        for n, et in contract.event_types.items()
    )
    # DuckDB's JSON reader accepts a comma before a closing brace or bracket, which JSON does not:
    # such a line is malformed. Only lines with a comma, whitespace and a bracket anywhere (a
    # search for ',' first: 0.18 CPU s per million lines, against 0.47 for five substring
    # searches and 0.65 for the full expression on every line) are searched with the expression
    # that skips strings. (A shortcut on the minified envelope's length missed commas that a
    # number's longer re-spelling, 1e2 -> 100.0, made up for.)
    trailing_sql = (f"case when is_object and regexp_matches(line, {_lit(TRAILING_CANDIDATE_RE)}) "
                    f"then regexp_matches(line, {_lit(TRAILING_COMMA_RE)}) else false end")
    plain_sql = (f"coalesce((case e.event_type::varchar {plain_cases} end) "
                 "= strlen(e.payload::varchar) or e.payload::varchar = '{}', false)")

    def parsed(source: str, extra: str) -> str:
        """Select of the typed columns of every line of `source` (file_id, line_number, line),
        keeping its column `extra` as well."""
        return f"""
        select file_id, line_number, content_hash, is_json, is_object, {extra}, trailing_comma,
            case when jt_e_payload = {JT_OBJECT} then j_payload end as e_payload,
            case when jt_p_answers = {JT_OBJECT} then j_answers end as p_answers,
            sv_p_total as p_total, *
            exclude (file_id, line_number, content_hash, is_json, is_object, {extra}, trailing_comma,
                     j_payload, j_answers)
        from (
            -- (j_*: the JSON values themselves; a text cast back to JSON would parse it again)
            select file_id, line_number, content_hash, is_json, is_object, {extra},
                e.payload as j_payload, p.answers as j_answers,
                {plain_sql} as payload_plain,
                {trailing_sql} as trailing_comma,
                {typed}
            from (
                select *, case when ascii(e.payload::varchar) = {JT_OBJECT}
                    then json_transform(e.payload, {_lit(pay_spec)}) end as p
                from (
                    select *, md5(line) as content_hash,
                        json_valid(line) as is_json,
                        contains(line, '\\') as has_esc,
                        (strlen(line) <> length(line) or has_esc
                            or contains(line, chr(127))) as odd_line,
                        -- (ltrim copies the line: only for lines not starting with a brace)
                        case when ascii(line) = {JT_OBJECT} then is_json
                            else is_json and starts_with(ltrim(line, ' \t\r\n'), '{{') end as is_object,
                        case when is_object then json_transform(line, {_lit(env_spec)}) end as e
                    from {source})))"""

    return [
        # The typed columns are never materialised (60 columns of a million rows cost more to
        # write than to compute): the rules read them in the same pipeline, and only the columns
        # later steps need are kept. _ruled is not a materialised CTE: DuckDB computes the rule
        # CASE once, in its own projection, either way, and materialising the CTE cost 1.5-2 s
        # per million lines.
        f"""create or replace temp table _checked as
        with _ruled as (
            select file_id, line_number, content_hash, is_json, is_object, rule_idx,
                case when rule_idx is not null then line end as bad_line,
                sv_e_event_id as event_id, sv_e_event_type as event_type, sv_e_clinic_id as clinic_id,
                jt_e_payload, e_payload,
                sv_e_schema_version, sv_e_occurred_at, sv_e_source,
                case when jt_e_patient_id = {JT_STRING} then sv_e_patient_id end as raw_patient_id,
                case when jt_e_therapist_id = {JT_STRING} then sv_e_therapist_id end as raw_therapist_id,
                case when jt_e_episode_id = {JT_STRING} then sv_e_episode_id end as raw_episode_id,
                case when jt_e_session_id = {JT_STRING} then sv_e_session_id end as raw_session_id,
                sv_p_instrument as instrument, sv_p_instrument_version as instrument_version,
                p_answers, jt_p_answers, p_total, jt_p_total, payload_plain
            from (select *, {rule_idx} as rule_idx from (
                select *, list_position({_list_lit(types)}, sv_e_event_type) as type_idx
                from ({parsed("_lines", "line")}))))
        -- kept_payload: the allow-listed payload where fields were dropped; the payload as sent
        -- (e_payload) otherwise, taken from there when written rather than stored twice here
        select *, case when rule_idx is null and dropped_fields > 0 then {kept} end as kept_payload
        from (select *,
            ({reasons})[rule_idx] as reason_code,
            nullif(({fields})[rule_idx], '') as field,
            null::varchar as message,
            case when jt_e_payload = {JT_OBJECT} and not payload_plain then json_keys(e_payload)
                end as payload_keys,
            -- (the allow-list, a list per row, is only built for the rows that list their keys)
            case when payload_keys is null then 0
                else len(payload_keys) - len(list_intersect(payload_keys, {allowed})) end
                as dropped_fields
        from _ruled)""",
        # Messages only for the rejected lines, parsed again from the copy kept in bad_line.
        # (a small table of their own, read where a rejected line is written)
        f"""create or replace temp table _rule_messages as
        select file_id, line_number, {message} as message
        from ({parsed("(select file_id, line_number, bad_line as line, rule_idx from _checked where rule_idx is not null)", "rule_idx")})""",
    ]


# --------------------------------------------------------------------------- reading files


@dataclass
class _ReadFile:
    path: Path
    sha256: str
    size: int
    lines: pa.Table | None  # line_number, line (UTF-8 text; "" where the bytes were not UTF-8)
    blank: int
    bad_encoding: list[int] = field(default_factory=list)  # line numbers that are not UTF-8
    raw_lines: list[bytes] | None = None  # kept only for files with undecodable lines
    error: str | None = None

    @property
    def n_lines(self) -> int:
        return 0 if self.lines is None else self.lines.num_rows

    @functools.cached_property
    def _line_numbers(self) -> np.ndarray:
        """The line numbers, ascending (blank lines left out), converted once per file."""
        return self.lines["line_number"].to_numpy()

    def raw_line(self, line_number: int) -> bytes:
        if self.raw_lines is not None:
            return self.raw_lines[line_number - 1]
        # a binary search, not a scan per line
        numbers = self._line_numbers
        idx = int(np.searchsorted(numbers, line_number))
        if idx >= len(numbers) or numbers[idx] != line_number:
            raise KeyError(f"{self.path}: no line {line_number}")
        return self.lines["line"][idx].as_py().encode()


def _read_file(path: Path, raw: bytes, sha: str) -> _ReadFile:
    """Split a file into numbered lines without a Python loop per line (blank lines dropped)."""
    try:
        data = gzip.decompress(raw) if path.name.endswith(".gz") else raw
    except (OSError, EOFError, zlib.error) as e:
        # (a damaged deflate stream raises zlib.error, not OSError: it stopped the whole ingest)
        return _ReadFile(path, sha, len(raw), None, 0, error=f"{path}: cannot decompress ({e})")
    if data.startswith(b"\xef\xbb\xbf"):
        # A UTF-8 byte order mark (Windows exports write one) is no part of the first line: kept,
        # it made that line malformed JSON. The file's sha256 is of its bytes as received.
        data = data[3:]
    bad: list[int] = []
    raw_lines: list[bytes] | None = None
    try:
        # Arrow checks the UTF-8 (the same bytes fail as Python's strict decoder) without
        # decoding the file into a Python string and encoding it back.
        text = pa.array([data], pa.large_binary()).cast(pa.large_string())
    except pa.ArrowInvalid:
        text = None
    if text is not None:
        # Split in Arrow (C++), not in a Python loop: the file is one string, cut at newlines.
        arr = pc.split_pattern(text, "\n").flatten()
        if data.endswith(b"\n") or not data:
            arr = arr.slice(0, len(arr) - 1)
        has_cr = b"\r" in data
        del text
    else:
        raw_lines = data.split(b"\n")
        texts = []
        for i, b in enumerate(raw_lines):
            try:
                texts.append(b.decode("utf-8"))
            except UnicodeDecodeError:
                texts.append("")
                bad.append(i + 1)
        if raw_lines[-1] == b"":  # the file ends with a newline (not an undecodable last line)
            texts.pop()
        arr = pa.array(texts, pa.large_string())
        has_cr = True
    n = len(arr)
    numbers = pa.array(np.arange(1, n + 1, dtype=np.int64))
    if has_cr:
        arr = pc.utf8_rtrim(arr, characters="\r")
    # Blank: empty or whitespace only (the same set utf8_trim_whitespace leaves empty, without
    # copying every line to trim it).
    keep = pc.invert(pc.or_(pc.equal(pc.binary_length(arr), 0), pc.utf8_is_space(arr)))
    if bad:
        keep = pc.or_(keep, pc.is_in(numbers, pa.array(bad, pa.int64())))
    table = pa.table({"line_number": numbers, "line": arr})
    if not pc.all(keep).as_py():  # (a filter copies every line, and nearly every file has none)
        table = table.filter(keep)
    return _ReadFile(path, sha, len(raw), table, n - table.num_rows, bad, raw_lines)


# --------------------------------------------------------------------------- ingest


# Names the first answer-level violation of each questionnaire line.
ANSWER_RULES_SQL = """
with
q as (
    select file_id, line_number, instrument, instrument_version, p_answers, jt_p_answers, p_total,
        jt_p_total
    from _checked
    where reason_code is null and list_contains(['questionnaire.submitted', 'questionnaire.amended'], event_type)
),
known as (
    select q.*, i.instrument is not null as known_instrument, i.kind, i.total_min, i.total_max,
        i.total_step
    from q left join _instrument_versions i using (instrument, instrument_version)
),
answers as (
    -- one parse per response: the answers object as key/value pairs
    -- (entry: the pair's position, to tell an item key the object repeats; JSON allows it,
    -- but which answer counts would be arbitrary: one parser keeps the first, another the last)
    select file_id, line_number, instrument, instrument_version, unnest(map_entries(m)) as e,
        generate_subscripts(map_keys(m), 1) as entry, map_keys(m) as item_keys
    from (
        select file_id, line_number, instrument, instrument_version,
            json_transform(p_answers, '"MAP(VARCHAR, JSON)"') as m
        from known
        where known_instrument and jt_p_answers = 123 -- '{'
            and not (/*plain answers*/)
    )
),
answer_values as (
    -- the JSON type from the value's first character and the number from its text: no parse
    select file_id, line_number, instrument, instrument_version, e.key as item, entry,
        list_position(item_keys, e.key) <> entry as repeated,
        e.value::varchar as v, ascii(v) as t,
        case when t between 48 and 57 or t = 45 then try_cast(v as double) end as x
    from answers
),
answer_checks as (
    -- ord: the first violation is the lowest item number, then keys that are not numbers by
    -- text, then a repeated key's entries in document order (never NULL: arg_min skips NULL keys)
    select a.file_id, a.line_number, a.item,
        (try_cast(a.item as integer) is null, coalesce(try_cast(a.item as integer), 0), a.item,
         a.entry) as ord,
        case
            when it.item is null then 'unknown_item'
            when a.repeated then 'invalid_value'
            when a.v is null or a.v = 'null' then null
            when a.x is null then 'wrong_type'
            when a.x < it.min_value or a.x > it.max_value then 'answer_out_of_range'
            when it.step is not null and it.step > 0
                and abs(round((a.x - it.min_value) / it.step)
                        - (a.x - it.min_value) / it.step) > 1e-9 then 'answer_out_of_range'
        end as reason_code,
        case
            when it.item is null then a.instrument || ' v' || a.instrument_version
                || case when regexp_full_match(a.item, '[0-9]{1,4}')
                    then ' has no item ''' || a.item || ''''
                    else ' has no item with that key (item keys are item numbers)' end
            when a.repeated then
                'answer to ' || a.instrument || ' item ' || a.item || ' is given more than once'
            when a.x is null and a.v <> 'null' then
                'answer to ' || a.instrument || ' item ' || a.item || ' must be a number or null, got '
                || lower(json_type(a.v::json))
            else 'answer ' || a.v || ' to ' || a.instrument || ' item ' || a.item
                || ' is outside ' || it.min_value::varchar || '..' || it.max_value::varchar
                || coalesce(' in steps of ' || it.step::varchar, '')
        end as message
    from answer_values a
    left join _instrument_items it using (instrument, instrument_version, item)
),
first_answer_violation as (
    select file_id, line_number,
        arg_min(reason_code, ord) as reason_code,
        -- (a key that is not an item number is not repeated: it could be free text)
        arg_min('payload.answers' || case when regexp_full_match(item, '[0-9]{1,4}')
            then '.' || item else '' end, ord) as field,
        arg_min(message, ord) as message
    from answer_checks where reason_code is not null
    group by all
),
instrument_violations as (
    select file_id, line_number, 'unknown_instrument' as reason_code, 'payload.instrument' as field,
        -- Values are repeated only when they cannot be free text or an identifier: a code that
        -- schemas/instruments defines, a version that is a short number. (An instrument code
        -- that merely looks like one could be anything; the verbatim line is in the quarantine
        -- file, outside the warehouse.)
        case when instrument in (select instrument from _instrument_versions)
            then 'instrument ''' || instrument || ''' has no version '
                || case when regexp_full_match(instrument_version, '[0-9]{1,2}([.][0-9]{1,2})?')
                        then '''' || instrument_version || ''' ' else 'as sent ' end
                || 'in schemas/instruments (defined: ' || (select string_agg(v.instrument_version,
                    ', ' order by v.instrument_version) from _instrument_versions v
                    where v.instrument = known.instrument) || ')'
            else 'the instrument is not defined in the instrument definitions (schemas/instruments, $ALLIANCE_INSTRUMENTS_DIR; which one is in the '
                || 'quarantined line, kept outside the warehouse)' end
            as message
    from known where not known_instrument
    union all
    select file_id, line_number, 'missing_field', 'payload.total',
        'field ''payload.total'' is required for the total-only instrument ' || instrument
    from known
    where known_instrument and kind = 'total_only'
        and jt_p_total is null
    union all
    select file_id, line_number, 'answer_out_of_range', 'payload.total',
        'total ' || p_total::varchar || ' for ' || instrument || ' is outside '
            || total_min::varchar || '..' || total_max::varchar
    from known
    where known_instrument and (jt_p_total between 48 and 57 or jt_p_total = 45) -- a number
        and total_min is not null
        and (p_total::double < total_min or p_total::double > total_max)
    union all
    -- a total-only instrument's total is all there is: it must lie on the definition's grid
    select file_id, line_number, 'answer_out_of_range', 'payload.total',
        'total ' || p_total::varchar || ' for ' || instrument || ' is not in steps of '
            || total_step::varchar || ' from ' || total_min::varchar
    from known
    where known_instrument and kind = 'total_only'
        and (jt_p_total between 48 and 57 or jt_p_total = 45)
        and total_step > 0 and total_min is not null
        and p_total::double between total_min and total_max
        and abs(round((p_total::double - total_min) / total_step)
                - (p_total::double - total_min) / total_step) > 1e-9
)
select * from instrument_violations
union all
select * from first_answer_violation
where (file_id, line_number) not in (select (file_id, line_number) from instrument_violations)
"""


# Longest expression of plain answers per instrument: RE2 refuses patterns beyond a few hundred
# kB (and then the whole statement fails), and long ones match slowly. Longer: no shortcut.
PLAIN_ANSWERS_MAX_PATTERN = 8_000


def _answer_value_re(lo: float, hi: float, step: float) -> str | None:
    """RE2 of every allowed answer as DuckDB's JSON writer spells it (null, 3, 3.0, 7.1), for an
    item whose range is whole numbers in 0..1000, at most 100 apart, in steps of 1 or 0.1; None
    for any other. (Beyond about 2^21 the rules' floating-point step test rejects values such as
    10000000.1 that the expression would spell.)"""
    lo_d, hi_d, step_d = Decimal(str(lo)), Decimal(str(hi)), Decimal(str(step))
    if (lo_d < 0 or hi_d > 1000 or lo_d != lo_d.to_integral() or hi_d != hi_d.to_integral()
            or hi_d - lo_d > 100):
        return None
    low, high = int(lo_d), int(hi_d)
    if step_d == 1:
        return "(?:null|(?:" + "|".join(str(i) for i in range(low, high + 1)) + r")(?:\.0)?)"
    if step_d == Decimal("0.1"):
        return ("(?:null|(?:" + "|".join(str(i) for i in range(low, high)) + r")(?:\.[0-9])?"
                f"|{high}" + r"(?:\.0)?)")
    return None


def _plain_answers_sql(instruments: object) -> str:
    """SQL true for an answers object that certainly breaks no answer rule (over `known`).

    The answer rules unnest every answer and join it to its item (a million answers a second
    at best). Nearly every answers object is plain: the instrument's item keys in ascending
    order, each once, every value null or an allowed number. One regular expression per
    instrument recognises those (0.25 against 1.0 CPU s per million lines); any other object,
    valid or not, goes through the rules, which name the violation. Instruments whose items
    `_answer_value_re` cannot spell have no expression: all their objects go through the rules.
    """
    whens = []
    for inst in sorted(instruments.values(), key=lambda i: i.key):
        if inst.kind != "item_level" or not inst.items:
            continue
        values = {it.number: _answer_value_re(it.min_value, it.max_value, it.step) for it in inst.items}
        if None in values.values():
            continue
        # Items in ascending order, each optional, each followed by the comma or the closing
        # brace: the text is minified JSON of an object, so it ends with the brace, which only
        # the last item present can take ('{}' does not match: nothing to check anyway).
        pattern = r"\{" + "".join(f'(?:"{k}":{values[k]}[,}}])?' for k in sorted(values))
        if len(pattern) > PLAIN_ANSWERS_MAX_PATTERN:
            continue
        whens.append(f"when instrument = {_lit(inst.code)} and instrument_version = {_lit(inst.version)} "
                     f"then regexp_full_match(p_answers::varchar, {_lit(pattern)})")
    return f"case {' '.join(whens)} else false end" if whens else "false"


def _answer_rules_sql(instruments: object) -> str:
    return ANSWER_RULES_SQL.replace("/*plain answers*/", _plain_answers_sql(instruments))


def _register_instruments(con: duckdb.DuckDBPyConnection, instruments: object | None) -> bool:
    """Register _instrument_items / _instrument_versions temp tables; False when none are known."""
    if instruments is None:
        return False
    from alliance import instruments as ins  # local: keeps ingest importable on its own

    items = ins.items_table(instruments)
    insts = sorted(instruments.values(), key=lambda i: i.key)
    versions = pa.table({
        "instrument": pa.array([i.code for i in insts], pa.string()),
        "instrument_version": pa.array([i.version for i in insts], pa.string()),
        "kind": pa.array([i.kind for i in insts], pa.string()),
        "total_min": pa.array([i.total_min for i in insts], pa.float64()),
        "total_max": pa.array([i.total_max for i in insts], pa.float64()),
        "total_step": pa.array([i.total_step for i in insts], pa.float64()),
    })
    con.register("_instrument_items_arrow", items)
    con.register("_instrument_versions_arrow", versions)
    con.execute("create or replace temp table _instrument_items as select * from _instrument_items_arrow")
    con.execute(
        "create or replace temp table _instrument_versions as select * from _instrument_versions_arrow"
    )
    con.unregister("_instrument_items_arrow")
    con.unregister("_instrument_versions_arrow")
    return True


def ingest_files(
    con: duckdb.DuckDBPyConnection,
    paths: Iterable[Path],
    key: bytes,
    *,
    contract: Contract | None = None,
    instruments: object | None = "default",
    quarantine_dir: Path | None = None,
    recorded_at: datetime | None = None,
    max_lines_per_transaction: int = MAX_LINES_PER_TRANSACTION,
    log=None,
) -> list[FileResult]:
    """Ingest files into raw.events; files already ingested (same sha256) are a no-op.

    Files are validated in groups of whole files (at most MAX_LINES_PER_GROUP lines, fewer when
    ``max_lines_per_transaction`` is smaller) and committed in transactions of whole groups, each
    with the groups' manifest rows: a crash loses the open transaction as a whole, and a re-run
    finishes the work exactly once.

    ``instruments="default"`` loads schemas/instruments (plus $ALLIANCE_INSTRUMENTS_DIR) to check
    answers; pass None to skip answer checks (only for tests of the envelope).
    """
    contract = contract or load_contract()
    ensure_raw_schema(con)
    if instruments == "default":
        from alliance.instruments import load_instruments

        instruments = load_instruments()
    has_instruments = _register_instruments(con, instruments)
    validation_sql = _validation_sql(contract)
    answer_sql = _answer_rules_sql(instruments) if has_instruments else None

    # Row order inside raw.events means nothing (every reader orders by what it needs), and
    # letting DuckDB write unordered makes the inserts parallel.
    preserve = con.execute("select current_setting('preserve_insertion_order')").fetchone()[0]
    con.execute("set preserve_insertion_order = false")
    try:
        return _ingest_paths(con, [Path(p) for p in paths], key, validation_sql,
                             _echo_sql(contract), answer_sql,
                             quarantine_dir, recorded_at, max_lines_per_transaction, log)
    finally:
        con.execute(f"set preserve_insertion_order = {str(bool(preserve)).lower()}")
        for table in STAGE_TABLES:  # created by _Stage; what was not committed is lost
            con.execute(f"drop table if exists _stage_{table}")


def _ingest_paths(
    con: duckdb.DuckDBPyConnection,
    paths: list[Path],
    key: bytes,
    validation_sql: list[str],
    echo: dict[str, str],
    answer_sql: str | None,
    quarantine_dir: Path | None,
    recorded_at: datetime | None,
    max_lines_per_transaction: int,
    log,
) -> list[FileResult]:
    """Read the files one by one, validate them in groups, commit in transactions of groups."""
    results: list[FileResult] = []
    group: list[_ReadFile] = []
    group_lines = 0
    group_limit = min(MAX_LINES_PER_GROUP, max_lines_per_transaction)
    stage = _Stage(con, recorded_at)
    seen_in_call: set[str] = set()
    # Any content seen before is a no-op (an unreadable file stays recorded once, not per run).
    done = {r[0] for r in con.execute("select sha256 from raw.ingested_files").fetchall()}
    next_id = con.execute("select coalesce(max(file_id), 0) + 1 from raw.ingested_files").fetchone()[0]
    groups_run = 0
    # File ids follow the files' order (unreadable ones included) whatever the grouping, so a
    # re-run after a crash numbers the rest exactly as an uninterrupted run did: transactions
    # commit everything read before them, so the committed files are always a prefix.
    ids: dict[str, int] = {}

    def run_group() -> None:
        nonlocal group, group_lines, groups_run, ids
        groups_run += 1
        stage.add(_ingest_group(con, group, ids, key, validation_sql, echo, answer_sql, quarantine_dir,
                                log))
        group, group_lines, ids = [], 0, {}
        if stage.lines >= max_lines_per_transaction:
            results.extend(stage.commit(log))

    for p, sha, rf in _read_ahead(paths, done):
        if sha is None:
            # Gone between listing and reading (moved away, or a producer's re-send): nothing
            # was read, so nothing is recorded; the next run that finds it in landing ingests it
            # (the nightly run: the landing sensor asked for its content's run already).
            results.append(FileResult(str(p), "", "vanished",
                                      error=f"{p}: vanished before it was read; not recorded"))
            if log:
                log(results[-1].error)
            continue
        if rf is None or sha in seen_in_call:
            results.append(FileResult(str(p), sha, "already_ingested"))
            continue
        seen_in_call.add(rf.sha256)
        if rf.error:
            # Recorded with the open transaction, so a crash and a re-run number every file as
            # an uninterrupted run does.
            stage.add(_unreadable(rf, next_id))
            next_id += 1
            if log:
                log(rf.error)
            continue
        # The first group is a quarter of the others: DuckDB starts on it while the reading
        # thread reads the next one, instead of waiting for a whole group to be read.
        limit = group_limit if groups_run else max(1, group_limit // 4)
        if group and group_lines + rf.n_lines > limit:
            run_group()
        group.append(rf)
        group_lines += rf.n_lines
        ids[rf.sha256] = next_id
        next_id += 1
    if group:
        run_group()
    results.extend(stage.commit(log))
    return results


# Bytes of files read ahead of the one being processed: more than a group's worth (500k lines
# are about 220 MB of canonical NDJSON), so the next group is read while one is in DuckDB.
READ_AHEAD_BYTES = 256 * 2**20


def _read_ahead(paths: list[Path], done: set[str]
                ) -> Iterator[tuple[Path, str | None, _ReadFile | None]]:
    """(path, sha256, read file or None when its content was ingested before), in path order;
    sha256 None for a file that was gone when its turn came.

    A thread reads, hashes and splits the next files while the caller works in DuckDB (which
    releases the GIL, as do reading, hashing and Arrow's split), up to READ_AHEAD_BYTES ahead
    (a single larger file is still read): the file handling of a million lines, about 2 s, no
    longer waits for the SQL, or the SQL for it.
    """
    out: queue.Queue = queue.Queue()
    budget = threading.Condition()
    ahead = [0]  # bytes read and not yet taken
    stop = threading.Event()

    def read() -> None:
        try:
            for p in paths:
                with budget:
                    budget.wait_for(lambda: ahead[0] < READ_AHEAD_BYTES or stop.is_set())
                if stop.is_set():
                    return
                try:
                    raw = p.read_bytes()
                except FileNotFoundError:
                    out.put((0, (p, None, None)))  # listed, then gone: the caller notes it
                    continue
                sha = hashlib.sha256(raw).hexdigest()
                item = (p, sha, None if sha in done else _read_file(p, raw, sha))
                with budget:
                    ahead[0] += len(raw)
                out.put((len(raw), item))
                del raw
            out.put(None)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller
            out.put(e)

    thread = threading.Thread(target=read, name="ingest-read-ahead", daemon=True)
    thread.start()
    try:
        while (got := out.get()) is not None:
            if isinstance(got, BaseException):
                raise got
            size, item = got
            with budget:
                ahead[0] -= size
                budget.notify()
            yield item
    finally:
        stop.set()
        with budget:
            budget.notify()
        thread.join()


STAGE_TABLES = ("events", "quarantine")  # raw.<table> rows wait in temp table _stage_<table>


class _Stage:
    """Rows of validated groups waiting for their transaction (temporary tables).

    The log is written by one insert per transaction; recorded_at is the transaction's time,
    the same for its events, quarantine rows and manifest rows.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, recorded_at: datetime | None) -> None:
        self.con, self.recorded_at = con, recorded_at
        self.results: list[FileResult] = []
        self.manifests: list[pa.Table] = []
        self.lines = 0
        for table in STAGE_TABLES:
            con.execute(f"create or replace temp table _stage_{table} as "
                        f"select * from raw.{table} limit 0")

    def add(self, staged: tuple[list[FileResult], pa.Table]) -> None:
        results, manifest = staged
        self.results.extend(results)
        self.manifests.append(manifest)
        self.lines += sum(r.lines_read for r in results)

    def commit(self, log) -> list[FileResult]:
        if not self.results:
            return []
        con = self.con
        t0 = time.perf_counter()
        rec = "?::timestamptz" if self.recorded_at is not None else "now()"
        params = [self.recorded_at] if self.recorded_at is not None else []
        manifest = pa.concat_tables(self.manifests)
        con.register("_manifest", manifest)
        con.execute("begin transaction")
        try:
            con.execute(f"insert into raw.events select * replace ({rec} as recorded_at) "
                        "from _stage_events", params)
            con.execute(f"insert into raw.quarantine select * replace ({rec} as recorded_at) "
                        "from _stage_quarantine", params)
            con.execute(
                f"""insert into raw.ingested_files select file_id, path, file_name, sha256, bytes,
                    lines_read, blank_lines, accepted, duplicates, quarantined, dropped_fields,
                    status, error, started_at, now(), {rec} from _manifest order by file_id""",
                params,
            )
            con.execute("commit")
        except BaseException:
            con.execute("rollback")
            raise
        finally:
            con.unregister("_manifest")
        for table in STAGE_TABLES:
            con.execute(f"delete from _stage_{table}")
        done, self.results, self.manifests, self.lines = self.results, [], [], 0
        if log:
            log(f"committed {len(done)} file(s), {sum(r.lines_read for r in done)} lines "
                f"({sum(r.accepted for r in done)} accepted) in {time.perf_counter() - t0:.2f}s")
        return done


def _manifest_table(rows: list[FileResult], group: list[_ReadFile], started_at: datetime,
                    status: str) -> pa.Table:
    """The manifest rows (raw.ingested_files) of files staged for the next transaction."""
    return pa.table({
        "file_id": [r.file_id for r in rows], "path": [r.path for r in rows],
        "file_name": [rf.path.name for rf in group], "sha256": [r.sha256 for r in rows],
        "bytes": [rf.size for rf in group], "lines_read": [r.lines_read for r in rows],
        "blank_lines": [r.blank_lines for r in rows], "accepted": [r.accepted for r in rows],
        "duplicates": [r.duplicates for r in rows],
        "quarantined": [r.quarantined for r in rows],
        "dropped_fields": [r.dropped_fields for r in rows],
        "status": [status] * len(rows),
        "error": pa.array([r.error for r in rows], pa.string()),
        "started_at": pa.array([started_at] * len(rows), pa.timestamp("us", tz="UTC")),
    })


def _unreadable(rf: _ReadFile, fid: int) -> tuple[list[FileResult], pa.Table]:
    """A file that cannot be read at all, staged so it shows in the manifest and status."""
    result = FileResult(str(rf.path), rf.sha256, "unreadable", fid, error=rf.error)
    return [result], _manifest_table([result], [rf], datetime.now().astimezone(), "unreadable")


def _pseudonym_table(con: duckdb.DuckDBPyConnection, key: bytes) -> None:
    """Pseudonyms of every distinct (kind, clinic, raw id) of the batch, computed in DuckDB.

    HMAC-SHA256 from its definition (`pseudonyms.hmac_pads`), vectorised: a Python loop cost
    about 2 s per million events. Equal to `pseudonyms.pseudonymiser` (tests/test_ingest.py).
    """
    inner, outer = hmac_pads(key)
    cases = " ".join(f"when '{k}' then '{p}'" for k, p in PREFIX.items())
    con.execute(
        f"""
        create or replace temp table _pseudonyms as
        select kind, clinic, raw,
            (case kind {cases} end) || left(sha256($outer::blob || unhex(sha256($inner::blob
                || encode(kind || '|' || clinic || '|' || raw)))), {DIGEST_CHARS}) as pseudonym
        from ({" union all ".join(
            f"(select distinct '{k}' as kind, coalesce(clinic_id, '') as clinic, raw_{k}_id as raw "
            f"from _checked where is_object and raw_{k}_id is not null)"
            for k in ("patient", "therapist", "episode", "session"))})
        """,
        {"inner": inner, "outer": outer},
    )


def _ingest_group(
    con: duckdb.DuckDBPyConnection,
    group: list[_ReadFile],
    file_ids: dict[str, int],
    key: bytes,
    validation_sql: list[str],
    echo: dict[str, str],
    answer_sql: str | None,
    quarantine_dir: Path | None,
    log,
) -> tuple[list[FileResult], pa.Table]:
    """Validate, de-duplicate and pseudonymise one group of files into the staging tables.

    Returns the files' accounting and their manifest rows; `_Stage.commit` writes them.
    """
    t0 = time.perf_counter()
    started_at = datetime.now().astimezone()
    parts, bad_enc = [], []
    for rf in group:
        fid = file_ids[rf.sha256]
        parts.append(rf.lines.add_column(0, "file_id", pa.array([fid] * rf.n_lines, pa.int64())))
        bad_enc.extend((fid, ln) for ln in rf.bad_encoding)
    lines_tbl = pa.concat_tables(parts)
    # Read in place from Arrow (no copy); unregistered when the group is done.
    con.register("_lines", lines_tbl)
    for stmt in validation_sql:
        con.execute(stmt)
    if bad_enc:
        enc = pa.table({"file_id": [f for f, _ in bad_enc], "line_number": [n for _, n in bad_enc]})
        con.register("_bad_enc", enc)
        con.execute("""
            update _checked set reason_code = 'invalid_encoding', field = null,
                message = 'is not valid UTF-8', is_json = false, is_object = false, event_id = null,
                content_hash = null, kept_payload = null
            where (file_id, line_number) in (select (file_id, line_number) from _bad_enc)
        """)
        con.unregister("_bad_enc")
    if answer_sql:
        con.execute(f"create or replace temp table _answer_violations as {answer_sql}")
        con.execute("""
            update _checked c set reason_code = v.reason_code, field = v.field, message = v.message
            from _answer_violations v
            where c.file_id = v.file_id and c.line_number = v.line_number and c.reason_code is null
        """)
    # Duplicates: against the log first, then within the batch (first line wins). Events of a
    # rejected file (alliance.rejections) do not count as logged: their corrected re-send is new.
    con.execute("""
        create or replace temp table _dedup as
        with valid as (
            select c.file_id, c.line_number, c.event_id, c.content_hash,
                e.content_hash as logged_hash
            from _checked c left join (
                select event_id, content_hash from raw.events
                where file_id not in (select file_id from raw.rejected_files)
                union all
                select event_id, content_hash from _stage_events
            ) e on e.event_id = c.event_id
            where c.reason_code is null
        ),
        fresh as (select * from valid where logged_hash is null),
        -- only event_ids that occur more than once in the batch are ranked (a sort); the rest,
        -- nearly all, are accepted: _dedup lists only the lines that are not
        repeated as (select event_id from fresh group by event_id having count(*) > 1),
        ranked as (
            select *, first_value(content_hash) over w as first_hash,
                row_number() over w as rn
            from fresh semi join repeated using (event_id)
            window w as (partition by event_id order by file_id, line_number)
        )
        select file_id, line_number,
            case when logged_hash = content_hash then 'duplicate'
                 when logged_hash is not null then 'conflict'
            end as outcome
        from valid where logged_hash is not null
        union all
        select * from (
            select file_id, line_number,
                case when rn = 1 then 'accept' when content_hash = first_hash then 'duplicate'
                     else 'conflict' end as outcome
            from ranked
        ) where outcome <> 'accept'
    """)
    con.execute("""
        update _checked c set reason_code = 'conflicting_duplicate', field = 'event_id',
            message = 'field ''event_id'' was already used for an event with different content'
        from _dedup d
        where c.file_id = d.file_id and c.line_number = d.line_number and d.outcome = 'conflict'
    """)
    _pseudonym_table(con, key)
    names = {file_ids[rf.sha256]: rf.path.name for rf in group}
    con.register("_names_arrow", pa.table({"file_id": list(names), "source_file": list(names.values())}))
    con.execute("create or replace temp table _names as select * from _names_arrow")
    con.unregister("_names_arrow")

    # Verbatim copies of rejected lines go outside the warehouse (they may hold raw identifiers).
    rejected = con.execute(
        "select c.file_id, c.line_number, c.reason_code, coalesce(c.message, m.message) "
        "from _checked c left join _rule_messages m using (file_id, line_number) "
        "where c.reason_code is not null order by c.file_id, c.line_number"
    ).fetchall()
    by_file: dict[int, list] = {}
    for fid, ln, reason, msg in rejected:
        by_file.setdefault(fid, []).append((ln, reason, msg))
    sha_rows: dict[str, list] = {"file_id": [], "line_number": [], "line_sha256": []}
    for rf in group:
        fid = file_ids[rf.sha256]
        if fid not in by_file:
            continue
        verbatim = {ln: rf.raw_line(ln) for ln, _, _ in by_file[fid]}
        for ln, line in verbatim.items():
            sha_rows["file_id"].append(fid)
            sha_rows["line_number"].append(ln)
            sha_rows["line_sha256"].append(hashlib.sha256(line).hexdigest())
        if quarantine_dir is None:
            continue
        quarantine_dir.mkdir(parents=True, exist_ok=True)
        tmp = quarantine_dir / f"{rf.sha256}.ndjson.tmp"
        with open(tmp, "w") as f:
            for ln, reason, msg in by_file[fid]:
                f.write(json.dumps({
                    "file": str(rf.path), "line_number": ln, "reason_code": reason,
                    "message": msg,
                    "line_base64": base64.b64encode(verbatim[ln]).decode(),
                }) + "\n")
        tmp.replace(quarantine_dir / f"{rf.sha256}.ndjson")
    # The sha256 of each rejected line, hashed here from its verbatim bytes rather than by
    # scanning every line of the group again in SQL.
    con.register("_rejected_sha", pa.table(sha_rows, schema=pa.schema([
        ("file_id", pa.int64()), ("line_number", pa.int64()), ("line_sha256", pa.string())])))

    pseudo = {k: f"(select pseudonym from _pseudonyms p where p.kind = '{k}' "
                 f"and p.clinic = coalesce(c.clinic_id, '') and p.raw = c.raw_{k}_id)"
              for k in ("patient", "therapist", "episode", "session")}
    ids_json = ", ".join(f"'{k}_id', {pseudo[k]}" for k in ("patient", "therapist", "episode", "session"))
    # recorded_at is set when the transaction commits (_Stage.commit).
    rec = "null::timestamptz"
    try:
        con.execute(f"""
            insert into _stage_events
            select c.event_id, c.content_hash, c.event_type, c.sv_e_schema_version::integer,
                c.sv_e_occurred_at::timestamptz, {rec}, c.sv_e_source, c.clinic_id,
                p1.pseudonym, p2.pseudonym, p3.pseudonym, p4.pseudonym,
                coalesce(c.kept_payload, c.e_payload), c.file_id, n.source_file, c.line_number,
                c.dropped_fields
            from _checked c
            anti join _dedup d on d.file_id = c.file_id and d.line_number = c.line_number
            join _names n on n.file_id = c.file_id
            left join _pseudonyms p1 on p1.kind = 'patient' and p1.clinic = c.clinic_id and p1.raw = c.raw_patient_id
            left join _pseudonyms p2 on p2.kind = 'therapist' and p2.clinic = c.clinic_id and p2.raw = c.raw_therapist_id
            left join _pseudonyms p3 on p3.kind = 'episode' and p3.clinic = c.clinic_id and p3.raw = c.raw_episode_id
            left join _pseudonyms p4 on p4.kind = 'session' and p4.clinic = c.clinic_id and p4.raw = c.raw_session_id
            where c.reason_code is null
        """)
        con.execute(f"""
            insert into _stage_quarantine
            select c.file_id, n.source_file, c.line_number, c.reason_code, nullif(c.field, ''),
                n.source_file || ' line ' || c.line_number::varchar || ': '
                    || coalesce(c.message, m.message),
                {echo["event_id"]}, {echo["event_type"]}, {echo["clinic_id"]},
                r.line_sha256,
                case when c.is_object then json_object(
                    'event_id', {echo["event_id"]}, 'event_type', {echo["event_type"]},
                    'schema_version', {echo["schema_version"]},
                    'occurred_at', {echo["occurred_at"]},
                    'source', {echo["source"]}, 'clinic_id', {echo["clinic_id"]}, {ids_json},
                    'payload_keys', k.known, 'other_payload_keys', len(k.keys) - len(k.known)) end,
                {rec}
            from _checked c
            cross join lateral (select keys, list_filter(keys, lambda x:
                list_contains({echo["payload_keys"]}, x)) as known
                from (select coalesce(c.payload_keys, case when c.payload_plain
                    then json_keys(c.e_payload) end) as keys)) k
            join _names n on n.file_id = c.file_id
            join _rejected_sha r on r.file_id = c.file_id and r.line_number = c.line_number
            left join _rule_messages m on m.file_id = c.file_id and m.line_number = c.line_number
            where c.reason_code is not null
        """)
        summary = con.execute("""
            select c.file_id, count(*) as lines_read,
                count(*) filter (where d.outcome is null and c.reason_code is null) as accepted,
                count(*) filter (where d.outcome = 'duplicate') as duplicates,
                count(*) filter (where c.reason_code is not null) as quarantined,
                coalesce(sum(c.dropped_fields) filter (where d.outcome is null and c.reason_code is null), 0)
            from _checked c left join _dedup d using (file_id, line_number)
            group by c.file_id
        """).fetchall()
        by_fid = {r[0]: r[1:] for r in summary}
        reasons = con.execute(
            "select file_id, reason_code, count(*) from _checked where reason_code is not null group by all"
        ).fetchall()
        reason_map: dict[int, dict[str, int]] = {}
        for fid, reason, n in reasons:
            reason_map.setdefault(fid, {})[reason] = n
        results = []
        for rf in group:
            fid = file_ids[rf.sha256]
            lines_read, accepted, duplicates, quarantined, dropped = by_fid.get(fid, (0, 0, 0, 0, 0))
            if lines_read != rf.n_lines or lines_read != accepted + duplicates + quarantined:
                raise IngestError(
                    f"{rf.path}: line accounting failed (read {rf.n_lines}, counted {lines_read} = "
                    f"{accepted} accepted + {duplicates} duplicates + {quarantined} quarantined); "
                    "nothing was written"
                )
            results.append(FileResult(str(rf.path), rf.sha256, "ingested", fid, lines_read, rf.blank,
                                      accepted, duplicates, quarantined, int(dropped),
                                      None, reason_map.get(fid, {})))
        manifest = _manifest_table(results, group, started_at, "ingested")
    finally:
        con.unregister("_lines")
        con.unregister("_rejected_sha")
    if log:
        total = sum(r.lines_read for r in results)
        log(f"validated {len(group)} file(s), {total} lines in {time.perf_counter() - t0:.2f}s")
    return results, manifest
