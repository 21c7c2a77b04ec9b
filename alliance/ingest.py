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
import gzip
import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from alliance.contract import Contract, FieldSpec, load_contract
from alliance.pseudonyms import pseudonym

LANDING_SUFFIXES = (".ndjson", ".jsonl", ".ndjson.gz", ".jsonl.gz")
TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".writing")
QUESTIONNAIRE_TYPES = ("questionnaire.submitted", "questionnaire.amended")
TIMESTAMP_RE = r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}(:?\d{2})?)$"
DATE_RE = r"^\d{4}-\d{2}-\d{2}$"
# Group size for one transaction: bounds memory at 10^7 events while keeping per-file overhead low.
MAX_LINES_PER_TRANSACTION = 2_000_000

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
    event_id varchar primary key,
    content_hash varchar not null,
    event_type varchar not null,
    schema_version integer not null,
    occurred_at timestamptz not null,
    recorded_at timestamptz not null,
    source varchar not null,
    clinic_id varchar not null,
    patient_id varchar,
    therapist_id varchar,
    episode_id varchar,
    session_id varchar,
    payload json not null,
    file_id bigint not null,
    source_file varchar not null,
    line_number bigint not null,
    dropped_fields integer not null
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
        "content_hash": "sha256 of the minified source line: tells exact duplicates from conflicts.",
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
    "raw.quarantine": {
        "reason_code": "Why the line was rejected (codes in schemas/events.yaml quarantine_reasons).",
        "field": "The offending field (dotted path), when there is one.",
        "message": "Human-readable explanation naming file, line and field.",
        "line_sha256": "sha256 of the verbatim line (kept outside the warehouse).",
        "line_redacted": "Envelope of the line with identifiers pseudonymised and no payload values; NULL when unparseable.",
    },
}


class IngestError(RuntimeError):
    """A file could not be ingested; the message names the file and what to do."""


@dataclass
class FileResult:
    """The accounting of one file."""

    path: str
    sha256: str
    status: str  # ingested | already_ingested | unreadable
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
    """Create the raw schema, its tables and their documentation if missing."""
    con.execute(RAW_DDL)
    for table, comment in TABLE_COMMENTS.items():
        con.execute(f"comment on table {table} is '{_sq(comment)}'")
    for table, cols in COLUMN_COMMENTS.items():
        for col, comment in cols.items():
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


def _col(name: str, prefix: str) -> str:
    return f"{prefix}{name.replace('.', '_')}"


def _type_violation(expr: str, spec: FieldSpec) -> str | None:
    """SQL that is true when a present, non-null JSON value has the wrong JSON type."""
    t = spec.type
    jt = f"json_type({expr})"
    if t in ("string", "timestamp", "date", "enum"):
        return f"{jt} <> 'VARCHAR'"
    if t == "integer":
        return f"{jt} not in ('BIGINT', 'UBIGINT')"
    if t == "number":
        return f"{jt} not in ('BIGINT', 'UBIGINT', 'DOUBLE')"
    if t == "boolean":
        return f"{jt} <> 'BOOLEAN'"
    if t == "object":
        return f"{jt} <> 'OBJECT'"
    return None


def _value_violation(expr: str, spec: FieldSpec) -> tuple[str, str] | None:
    """(SQL true when the value is not allowed, message SQL) for a value of the right type."""
    s = f"({expr}->>'$')"
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
            f"not (({expr})::double between '{lo}'::double and '{hi}'::double)",
            _lit(f"is outside {spec.minimum}..{spec.maximum}"),
        )
    return None


def _validation_sql(contract: Contract) -> str:
    """One SELECT over _lines that extracts the envelope and names the first violation per line."""
    env = contract.envelope
    env_names = list(env)
    payload_fields: dict[str, FieldSpec] = {}
    for et in contract.event_types.values():
        for name, spec in et.payload.items():
            payload_fields.setdefault(name, spec)
    pay_names = list(payload_fields)

    env_paths = ", ".join(_lit(f'$."{n}"') for n in env_names)
    pay_paths = ", ".join(_lit(f'$."{n}"') for n in pay_names)

    # (condition, reason_code, field, message-sql) in precedence order; first true wins.
    rules: list[tuple[str, str, str, str]] = [
        ("not is_json", "malformed_json", "", _lit("is not valid JSON")),
        ("json_type(doc) <> 'OBJECT'", "not_an_object", "", _lit("is JSON but not an object")),
    ]

    def missing(col: str) -> str:
        return f"({col} is null or json_type({col}) = 'NULL')"

    def present(col: str) -> str:
        return f"({col} is not null and json_type({col}) <> 'NULL')"

    for name, spec in env.items():
        col = _col(name, "e_")
        if spec.required:
            rules.append((missing(col), "missing_field", name, _lit("is required but missing")))
        tv = _type_violation(col, spec)
        if tv:
            rules.append((f"{present(col)} and {tv}", "wrong_type", name,
                          _lit(f"must be a JSON {spec.type}, got ") + f" || lower(json_type({col}))"))
    types = list(contract.event_types)
    rules.append((f"not list_contains({_list_lit(types)}, e_event_type->>'$')", "unknown_event_type",
                  "event_type", "'''' || (e_event_type->>'$') || ''' is not a known event type'"))
    version_cases = " ".join(
        f"when {_lit(n)} then list_contains([{', '.join(str(v) for v in et.schema_versions)}], "
        f"(e_schema_version)::bigint)"
        for n, et in contract.event_types.items()
    )
    rules.append((f"not (case e_event_type->>'$' {version_cases} else false end)",
                  "unsupported_schema_version", "schema_version",
                  "'version ' || e_schema_version::varchar || ' is not supported for ' || (e_event_type->>'$')"))
    for name, spec in env.items():
        col = _col(name, "e_")
        vv = _value_violation(col, spec)
        if vv:
            rules.append((f"{present(col)} and ({vv[0]})", "invalid_value", name, vv[1]))
    for tname, et in contract.event_types.items():
        is_type = f"e_event_type->>'$' = {_lit(tname)}"
        for req in et.requires:
            col = _col(req, "e_")
            rules.append((f"{is_type} and {missing(col)}", "missing_field", req,
                          _lit(f"is required for {tname} but missing")))
        for pname, spec in et.payload.items():
            col = _col(pname, "p_")
            fname = f"payload.{pname}"
            if spec.required:
                rules.append((f"{is_type} and {missing(col)}", "missing_field", fname,
                              _lit(f"is required for {tname} but missing")))
            tv = _type_violation(col, spec)
            if tv:
                rules.append((f"{is_type} and {present(col)} and {tv}", "wrong_type", fname,
                              _lit(f"must be a JSON {spec.type}, got ") + f" || lower(json_type({col}))"))
            vv = _value_violation(col, spec)
            if vv:
                rules.append((f"{is_type} and {present(col)} and ({vv[0]})", "invalid_value", fname,
                              vv[1]))
    q_types = _list_lit(QUESTIONNAIRE_TYPES)
    rules.append((f"list_contains({q_types}, e_event_type->>'$') and {missing('p_answers')} "
                  f"and {missing('p_total')}", "missing_answers", "payload.answers",
                  _lit("and payload.total are both missing: one is required")))

    reason = "case " + " ".join(f"when {c} then {_lit(r)}" for c, r, _, _ in rules) + " end"
    fieldx = "case " + " ".join(f"when {c} then {_lit(f)}" for c, _, f, _ in rules) + " end"
    message = "case " + " ".join(
        f"when {c} then " + (f"{_lit('field ' + repr(f) + ' ')} || {m}" if f else m)
        for c, _, f, m in rules
    ) + " end"

    allowed = "map {" + ", ".join(
        f"{_lit(n)}: {_list_lit(et.payload)}" for n, et in contract.event_types.items()
    ) + "}"
    env_cols = ",\n        ".join(f"env[{i + 1}] as {_col(n, 'e_')}" for i, n in enumerate(env_names))
    pay_cols = ",\n        ".join(f"pay[{i + 1}] as {_col(n, 'p_')}" for i, n in enumerate(pay_names))
    env_list = _list_lit(env_names)
    # Rebuild the payload from allow-listed fields only; merge_patch drops the absent (null) ones.
    kept = "case e_event_type->>'$' " + " ".join(
        f"when {_lit(n)} then "
        + (("json_merge_patch('{}', json_object(" + ", ".join(
            f"{_lit(k)}, {_col(k, 'p_')}" for k in et.payload) + "))") if et.payload else "'{}'::json")
        for n, et in contract.event_types.items()
    ) + " end"
    return f"""
with
lines as (select file_id, line_number, line, json_valid(line) as is_json from _lines),
docs as (
    select *, case when is_json then line::json end as doc from lines
),
env as (
    select *, json_extract(doc, [{env_paths}]) as env from docs
),
pay as (
    select *, json_extract(env[{env_names.index('payload') + 1}], [{pay_paths}]) as pay from env
),
cols as (
    select file_id, line_number, line, is_json, doc,
        {env_cols},
        {pay_cols}
    from pay
)
select
    file_id, line_number, line, is_json,
    {reason} as reason_code,
    {fieldx} as field,
    {message} as message,
    e_event_id->>'$' as event_id,
    e_event_type->>'$' as event_type,
    e_clinic_id->>'$' as clinic_id,
    e_event_id, e_event_type, e_clinic_id,
    e_schema_version, e_occurred_at, e_source, e_patient_id, e_therapist_id, e_episode_id,
    e_session_id, e_payload, p_instrument, p_instrument_version, p_answers, p_total,
    case when is_json and json_type(doc) = 'OBJECT'
        then sha256(json(line)) end as content_hash,
    case when is_json and json_type(doc) = 'OBJECT' then
        len(list_filter(json_keys(doc), k -> not list_contains({env_list}, k)))
        + coalesce(len(list_filter(json_keys(e_payload),
            k -> not list_contains(coalesce({allowed}[e_event_type->>'$'], []::varchar[]), k))), 0)
    end as dropped_fields,
    case when json_type(e_payload) = 'OBJECT' then
        json_keys(e_payload) end as payload_keys,
    {kept} as kept_payload
from cols
"""


# --------------------------------------------------------------------------- reading files


@dataclass
class _ReadFile:
    path: Path
    sha256: str
    size: int
    lines: list[tuple[int, str | None, bytes]]  # (line_number, text or None if not UTF-8, raw)
    blank: int
    error: str | None = None


def _read_file(path: Path) -> _ReadFile:
    raw = path.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    try:
        data = gzip.decompress(raw) if path.name.endswith(".gz") else raw
    except (OSError, EOFError) as e:
        return _ReadFile(path, sha, len(raw), [], 0, f"{path}: cannot decompress ({e})")
    parts = data.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()
    lines: list[tuple[int, str | None, bytes]] = []
    blank = 0
    try:
        text_parts = data.decode("utf-8").split("\n")
        decoded: list[str | None] | None = text_parts
    except UnicodeDecodeError:
        decoded = None
    for i, b in enumerate(parts):
        if not b.strip():
            blank += 1
            continue
        if decoded is not None:
            t: str | None = decoded[i]
        else:
            try:
                t = b.decode("utf-8")
            except UnicodeDecodeError:
                t = None
        if t is not None and t.endswith("\r"):
            t = t[:-1]
        lines.append((i + 1, t, b))
    return _ReadFile(path, sha, len(raw), lines, blank)


# --------------------------------------------------------------------------- ingest


def _already_ingested(con: duckdb.DuckDBPyConnection, shas: Sequence[str]) -> set[str]:
    if not shas:
        return set()
    rows = con.execute(
        "select sha256 from raw.ingested_files where status = 'ingested' and list_contains(?, sha256)",
        [list(shas)],
    ).fetchall()
    return {r[0] for r in rows}


# Names the first answer-level violation of each questionnaire line.
ANSWER_RULES_SQL = """
with
q as (
    select file_id, line_number, p_instrument->>'$' as instrument,
        p_instrument_version->>'$' as instrument_version, p_answers, p_total
    from _checked
    where reason_code is null and list_contains(['questionnaire.submitted', 'questionnaire.amended'], event_type)
),
known as (
    select q.*, i.instrument is not null as known_instrument, i.kind, i.total_min, i.total_max
    from q left join _instrument_versions i using (instrument, instrument_version)
),
answers as (
    select file_id, line_number, instrument, instrument_version,
        unnest(json_keys(p_answers)) as item, p_answers
    from known
    where known_instrument and json_type(p_answers) = 'OBJECT'
),
answer_values as (
    select file_id, line_number, instrument, instrument_version, item,
        json_extract(p_answers, '$."' || replace(item, '"', '\\"') || '"') as v
    from answers
),
answer_checks as (
    select a.file_id, a.line_number, a.item,
        case
            when it.item is null then 'unknown_item'
            when json_type(a.v) = 'NULL' then null
            when json_type(a.v) not in ('BIGINT', 'UBIGINT', 'DOUBLE') then 'wrong_type'
            when a.v::double < it.min_value or a.v::double > it.max_value then 'answer_out_of_range'
            when it.step is not null and it.step > 0
                and abs(round((a.v::double - it.min_value) / it.step)
                        - (a.v::double - it.min_value) / it.step) > 1e-6 then 'answer_out_of_range'
        end as reason_code,
        case
            when it.item is null then a.instrument || ' v' || a.instrument_version
                || ' has no item ''' || a.item || ''''
            when json_type(a.v) not in ('BIGINT', 'UBIGINT', 'DOUBLE', 'NULL') then
                'answer to ' || a.instrument || ' item ' || a.item || ' must be a number or null, got '
                || lower(json_type(a.v))
            else 'answer ' || a.v::varchar || ' to ' || a.instrument || ' item ' || a.item
                || ' is outside ' || it.min_value::varchar || '..' || it.max_value::varchar
                || coalesce(' in steps of ' || it.step::varchar, '')
        end as message
    from answer_values a
    left join _instrument_items it using (instrument, instrument_version, item)
),
first_answer_violation as (
    select file_id, line_number,
        arg_min(reason_code, try_cast(item as integer)) as reason_code,
        arg_min('payload.answers.' || item, try_cast(item as integer)) as field,
        arg_min(message, try_cast(item as integer)) as message
    from answer_checks where reason_code is not null
    group by all
),
instrument_violations as (
    select file_id, line_number, 'unknown_instrument' as reason_code, 'payload.instrument' as field,
        'instrument ''' || instrument || ''' version ''' || instrument_version
            || ''' is not defined in schemas/instruments' as message
    from known where not known_instrument
    union all
    select file_id, line_number, 'missing_field', 'payload.total',
        'field ''payload.total'' is required for the total-only instrument ' || instrument
    from known
    where known_instrument and kind = 'total_only'
        and (p_total is null or json_type(p_total) = 'NULL')
    union all
    select file_id, line_number, 'answer_out_of_range', 'payload.total',
        'total ' || p_total::varchar || ' for ' || instrument || ' is outside '
            || total_min::varchar || '..' || total_max::varchar
    from known
    where known_instrument and json_type(p_total) in ('BIGINT', 'UBIGINT', 'DOUBLE')
        and total_min is not null
        and (p_total::double < total_min or p_total::double > total_max)
)
select * from instrument_violations
union all
select * from first_answer_violation
where (file_id, line_number) not in (select (file_id, line_number) from instrument_violations)
"""


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
    answer_sql = ANSWER_RULES_SQL if has_instruments else None

    paths = [Path(p) for p in paths]
    results: list[FileResult] = []
    group: list[_ReadFile] = []
    group_lines = 0
    seen_in_call: set[str] = set()
    done = _already_ingested(con, [file_sha256(p) for p in paths])
    for p in paths:
        rf = _read_file(p)
        if rf.sha256 in done or rf.sha256 in seen_in_call:
            results.append(FileResult(str(p), rf.sha256, "already_ingested"))
            continue
        if rf.error:
            results.append(_record_unreadable(con, rf, recorded_at))
            if log:
                log(rf.error)
            continue
        seen_in_call.add(rf.sha256)
        if group and group_lines + len(rf.lines) > max_lines_per_transaction:
            results.extend(_ingest_group(con, group, key, validation_sql, answer_sql,
                                         quarantine_dir, recorded_at, log))
            group, group_lines = [], 0
        group.append(rf)
        group_lines += len(rf.lines)
    if group:
        results.extend(_ingest_group(con, group, key, validation_sql, answer_sql,
                                     quarantine_dir, recorded_at, log))
    return results


def _record_unreadable(
    con: duckdb.DuckDBPyConnection, rf: _ReadFile, recorded_at: datetime | None
) -> FileResult:
    """Record a file that cannot be read at all, so it shows in the manifest and status."""
    fid = con.execute("select coalesce(max(file_id), 0) + 1 from raw.ingested_files").fetchone()[0]
    rec = "?::timestamptz" if recorded_at is not None else "now()"
    con.execute(
        f"""insert into raw.ingested_files values
        (?, ?, ?, ?, ?, 0, 0, 0, 0, 0, 0, 'unreadable', ?, now(), now(), {rec})""",
        [fid, str(rf.path), rf.path.name, rf.sha256, rf.size, rf.error]
        + ([recorded_at] if recorded_at is not None else []),
    )
    return FileResult(str(rf.path), rf.sha256, "unreadable", fid, error=rf.error)


def _pseudonym_table(con: duckdb.DuckDBPyConnection, key: bytes) -> None:
    """Compute pseudonyms for every distinct (kind, clinic, raw id) of the batch in Python."""
    rows = con.execute(
        """
        select distinct kind, clinic, raw from (
            select unnest(['patient', 'therapist', 'episode', 'session']) as kind,
                coalesce(clinic_id, '') as clinic,
                unnest([e_patient_id->>'$', e_therapist_id->>'$', e_episode_id->>'$', e_session_id->>'$']) as raw,
                unnest([json_type(e_patient_id), json_type(e_therapist_id), json_type(e_episode_id),
                        json_type(e_session_id)]) as jt
            from _checked where is_json
        ) where raw is not null and jt = 'VARCHAR'
        """
    ).fetchall()
    kinds, clinics, raws, pseudos = [], [], [], []
    for kind, clinic, raw in rows:
        kinds.append(kind)
        clinics.append(clinic)
        raws.append(raw)
        pseudos.append(pseudonym(key, kind, clinic, raw))
    tbl = pa.table({"kind": kinds, "clinic": clinics, "raw": raws, "pseudonym": pseudos},
                   schema=pa.schema([("kind", pa.string()), ("clinic", pa.string()),
                                     ("raw", pa.string()), ("pseudonym", pa.string())]))
    con.register("_pseudonyms_arrow", tbl)
    con.execute("create or replace temp table _pseudonyms as select * from _pseudonyms_arrow")
    con.unregister("_pseudonyms_arrow")


def _ingest_group(
    con: duckdb.DuckDBPyConnection,
    group: list[_ReadFile],
    key: bytes,
    validation_sql: str,
    answer_sql: str | None,
    quarantine_dir: Path | None,
    recorded_at: datetime | None,
    log,
) -> list[FileResult]:
    t0 = time.perf_counter()
    next_id = con.execute("select coalesce(max(file_id), 0) + 1 from raw.ingested_files").fetchone()[0]
    file_ids = {rf.sha256: next_id + i for i, rf in enumerate(group)}
    fid_col, ln_col, text_col, bad_enc = [], [], [], []
    for rf in group:
        fid = file_ids[rf.sha256]
        for ln, text, _raw in rf.lines:
            fid_col.append(fid)
            ln_col.append(ln)
            text_col.append(text if text is not None else "")
            if text is None:
                bad_enc.append((fid, ln))
    lines_tbl = pa.table({"file_id": pa.array(fid_col, pa.int64()),
                          "line_number": pa.array(ln_col, pa.int64()),
                          "line": pa.array(text_col, pa.string())})
    con.register("_lines_arrow", lines_tbl)
    con.execute("create or replace temp table _lines as select * from _lines_arrow")
    con.unregister("_lines_arrow")
    con.execute(f"create or replace temp table _checked as {validation_sql}")
    if bad_enc:
        enc = pa.table({"file_id": [f for f, _ in bad_enc], "line_number": [n for _, n in bad_enc]})
        con.register("_bad_enc", enc)
        con.execute("""
            update _checked set reason_code = 'invalid_encoding', field = null,
                message = 'is not valid UTF-8', is_json = false, event_id = null, content_hash = null
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
    # Duplicates: against the log first, then within the batch (first line wins).
    con.execute("""
        create or replace temp table _dedup as
        with valid as (
            select c.file_id, c.line_number, c.event_id, c.content_hash,
                e.content_hash as logged_hash
            from _checked c left join raw.events e on e.event_id = c.event_id
            where c.reason_code is null
        ),
        ranked as (
            select *, first_value(content_hash) over w as first_hash,
                row_number() over w as rn
            from valid where logged_hash is null
            window w as (partition by event_id order by file_id, line_number)
        )
        select file_id, line_number,
            case when logged_hash = content_hash then 'duplicate'
                 when logged_hash is not null then 'conflict'
            end as outcome
        from valid where logged_hash is not null
        union all
        select file_id, line_number,
            case when rn = 1 then 'accept' when content_hash = first_hash then 'duplicate'
                 else 'conflict' end
        from ranked
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
        "select file_id, line_number, reason_code, message from _checked where reason_code is not null "
        "order by file_id, line_number"
    ).fetchall()
    if quarantine_dir is not None and rejected:
        quarantine_dir.mkdir(parents=True, exist_ok=True)
        by_file: dict[int, list] = {}
        for fid, ln, reason, msg in rejected:
            by_file.setdefault(fid, []).append((ln, reason, msg))
        for rf in group:
            fid = file_ids[rf.sha256]
            if fid not in by_file:
                continue
            raw_by_line = {ln: raw for ln, _t, raw in rf.lines}
            tmp = quarantine_dir / f"{rf.sha256}.ndjson.tmp"
            with open(tmp, "w") as f:
                for ln, reason, msg in by_file[fid]:
                    f.write(json.dumps({
                        "file": str(rf.path), "line_number": ln, "reason_code": reason,
                        "message": msg,
                        "line_base64": base64.b64encode(raw_by_line[ln]).decode(),
                    }) + "\n")
            tmp.replace(quarantine_dir / f"{rf.sha256}.ndjson")

    pseudo = {k: f"(select pseudonym from _pseudonyms p where p.kind = '{k}' "
                 f"and p.clinic = coalesce(c.clinic_id, '') and p.raw = (c.e_{k}_id->>'$'))"
              for k in ("patient", "therapist", "episode", "session")}
    ids_json = ", ".join(f"'{k}_id', {pseudo[k]}" for k in ("patient", "therapist", "episode", "session"))
    rec = "?::timestamptz" if recorded_at is not None else "now()"
    params = [recorded_at] if recorded_at is not None else []
    con.execute("begin transaction")
    try:
        con.execute(f"""
            insert into raw.events
            select c.event_id, c.content_hash, c.event_type, (c.e_schema_version)::integer,
                (c.e_occurred_at->>'$')::timestamptz, {rec}, c.e_source->>'$', c.clinic_id,
                p1.pseudonym, p2.pseudonym, p3.pseudonym, p4.pseudonym,
                c.kept_payload, c.file_id, n.source_file, c.line_number, c.dropped_fields
            from _checked c
            join _dedup d on d.file_id = c.file_id and d.line_number = c.line_number and d.outcome = 'accept'
            join _names n on n.file_id = c.file_id
            left join _pseudonyms p1 on p1.kind = 'patient' and p1.clinic = c.clinic_id and p1.raw = (c.e_patient_id->>'$')
            left join _pseudonyms p2 on p2.kind = 'therapist' and p2.clinic = c.clinic_id and p2.raw = (c.e_therapist_id->>'$')
            left join _pseudonyms p3 on p3.kind = 'episode' and p3.clinic = c.clinic_id and p3.raw = (c.e_episode_id->>'$')
            left join _pseudonyms p4 on p4.kind = 'session' and p4.clinic = c.clinic_id and p4.raw = (c.e_session_id->>'$')
            where c.reason_code is null
            order by c.file_id, c.line_number
        """, params)
        con.execute(f"""
            insert into raw.quarantine
            select c.file_id, n.source_file, c.line_number, c.reason_code, nullif(c.field, ''),
                n.source_file || ' line ' || c.line_number::varchar || ': ' || c.message,
                case when json_type(c.e_event_id) = 'VARCHAR' then c.event_id end,
                case when json_type(c.e_event_type) = 'VARCHAR' then c.event_type end,
                case when json_type(c.e_clinic_id) = 'VARCHAR' then c.clinic_id end,
                sha256(c.line),
                case when c.is_json and json_type(c.line::json) = 'OBJECT' then json_object(
                    'event_id', c.e_event_id, 'event_type', c.e_event_type,
                    'schema_version', c.e_schema_version, 'occurred_at', c.e_occurred_at,
                    'source', c.e_source, 'clinic_id', c.e_clinic_id, {ids_json},
                    'payload_keys', c.payload_keys) end,
                {rec}
            from _checked c
            join _names n on n.file_id = c.file_id
            where c.reason_code is not null
        """, params)
        summary = con.execute("""
            select c.file_id, count(*) as lines_read,
                count(*) filter (where d.outcome = 'accept' and c.reason_code is null) as accepted,
                count(*) filter (where d.outcome = 'duplicate') as duplicates,
                count(*) filter (where c.reason_code is not null) as quarantined,
                coalesce(sum(c.dropped_fields) filter (where d.outcome = 'accept' and c.reason_code is null), 0)
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
            if lines_read != len(rf.lines) or lines_read != accepted + duplicates + quarantined:
                raise IngestError(
                    f"{rf.path}: line accounting failed (read {len(rf.lines)}, counted {lines_read} = "
                    f"{accepted} accepted + {duplicates} duplicates + {quarantined} quarantined); "
                    "nothing was written"
                )
            con.execute(
                f"""insert into raw.ingested_files values
                (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'ingested', null, now(), now(), {rec})""",
                [fid, str(rf.path), rf.path.name, rf.sha256, rf.size, lines_read, rf.blank, accepted,
                 duplicates, quarantined, dropped, *params],
            )
            results.append(FileResult(str(rf.path), rf.sha256, "ingested", fid, lines_read, rf.blank,
                                      accepted, duplicates, quarantined, int(dropped),
                                      None, reason_map.get(fid, {})))
        con.execute("commit")
    except BaseException:
        con.execute("rollback")
        raise
    if log:
        total = sum(r.lines_read for r in results)
        log(f"ingested {len(group)} file(s), {total} lines in {time.perf_counter() - t0:.2f}s")
    return results
