"""The raw.events batch suite: contract checks on the events one ingest run added, with GX.

Only the new batch is read (rows whose `file_id` the run ingested, or files not validated yet,
tracked in quality.validated_batches), so the cost follows the batch, not the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import duckdb

from alliance import yamlio
from alliance.catalog import ensure_table
from alliance.contract import ID_FIELDS, Contract, load_contract
from quality.gx_runner import (
    MAX_FAILING_KEYS,
    CheckOutcome,
    ExpectationOutcome,
    ExpectationSpec,
    SuiteResult,
    validate_frame,
)

SUITES_DIR = Path(__file__).resolve().parent / "suites"
BATCH_PARAMS_FILE = SUITES_DIR / "batch.yaml"
SUITE_NAME = "raw_events_batch"
ANSWERS_SUITE_NAME = "raw_events_batch_answers"
QUESTIONNAIRE_TYPES = ("questionnaire.submitted", "questionnaire.amended")
# Failing keys are row locations: they point at the source line without carrying any value.
KEY_COLUMNS = ("file_id", "line_number")
ENVELOPE_COLUMNS = (
    "file_id", "line_number", "event_type", "schema_version", "occurred_at", "recorded_at",
    "source", "clinic_id", *ID_FIELDS,
)
# Events read into pandas at once: the batch is validated in chunks of whole files of at most this
# many events (the ingest's transaction size), so memory follows the chunk, not the batch.
CHUNK_EVENTS = 250_000


@dataclass(frozen=True)
class BatchParams:
    """Settings of the batch suite, from quality/suites/batch.yaml."""

    severities: dict[str, str]
    docs: dict[str, str]
    future_tolerance: timedelta
    occurred_at_floor: datetime
    pseudonym_patterns: dict[str, str]


def load_params(path: Path = BATCH_PARAMS_FILE) -> BatchParams:
    """Read the batch suite's parameters; errors name the file and the field."""
    raw = yamlio.safe_load(path.read_text()) or {}
    try:
        checks = raw["checks"]
        sev = {name: str(c["severity"]).upper() for name, c in checks.items()}
        floor = datetime.fromisoformat(str(raw["occurred_at_floor"]))
        tolerance = timedelta(minutes=float(raw["future_tolerance_minutes"]))
        patterns = {str(k): str(v) for k, v in raw["pseudonym_patterns"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: missing or invalid field {e}") from e
    bad = {k: v for k, v in sev.items() if v not in ("ERROR", "WARN")}
    if bad:
        raise ValueError(f"{path}: checks.*.severity must be 'error' or 'warn', got {bad}")
    if floor.tzinfo is None:
        floor = floor.replace(tzinfo=UTC)
    return BatchParams(
        severities=sev,
        docs={name: str(c.get("doc", "")) for name, c in checks.items()},
        future_tolerance=tolerance,
        occurred_at_floor=floor,
        pseudonym_patterns=patterns,
    )


@lru_cache(maxsize=1)
def default_params() -> BatchParams:
    """The parameters in quality/suites/batch.yaml (read once)."""
    return load_params()


def _payload_fields(contract: Contract) -> list[str]:
    """Every scalar payload field named in the contract (objects such as answers are exploded)."""
    names: list[str] = []
    for et in contract.event_types.values():
        for name, spec in et.payload.items():
            if spec.type != "object" and name not in names:
                names.append(name)
    return names


def payload_column(name: str) -> str:
    """The batch frame's column for a payload field."""
    return f"payload_{name}"


def batch_specs(
    contract: Contract | None = None,
    params: BatchParams | None = None,
    known_instruments: Iterable[str] | None = None,
    now: datetime | None = None,
) -> list[ExpectationSpec]:
    """The expectations of the events suite, derived from the event contract and the parameters."""
    contract = contract or load_contract()
    params = params or default_params()
    now = now or datetime.now(UTC)
    specs: list[ExpectationSpec] = []

    # required_fields_present: the envelope, then per event type its identifiers and payload.
    for name, fs in contract.envelope.items():
        if fs.required and name in ENVELOPE_COLUMNS:
            specs.append(ExpectationSpec("required_fields_present", "ExpectColumnValuesToNotBeNull",
                                         {"column": name}))
    for et in contract.event_types.values():
        for ident in et.requires:
            specs.append(ExpectationSpec("required_fields_present", "ExpectColumnValuesToNotBeNull",
                                         {"column": ident}, where=("event_type", et.name)))
        for fname, fs in et.payload.items():
            if fs.required and fs.type != "object":
                specs.append(ExpectationSpec(
                    "required_fields_present", "ExpectColumnValuesToNotBeNull",
                    {"column": payload_column(fname)}, where=("event_type", et.name)))

    # pseudonyms_well_formed
    for col, pattern in params.pseudonym_patterns.items():
        specs.append(ExpectationSpec("pseudonyms_well_formed", "ExpectColumnValuesToMatchRegex",
                                     {"column": col, "regex": pattern}))

    # codes_known
    specs.append(ExpectationSpec("codes_known", "ExpectColumnValuesToBeInSet",
                                 {"column": "event_type", "value_set": sorted(contract.event_types)}))
    clinic = contract.envelope.get("clinic_id")
    if clinic is not None and clinic.pattern:
        specs.append(ExpectationSpec("codes_known", "ExpectColumnValuesToMatchRegex",
                                     {"column": "clinic_id", "regex": clinic.pattern}))
    for et in contract.event_types.values():
        specs.append(ExpectationSpec(
            "codes_known", "ExpectColumnValuesToBeInSet",
            {"column": "schema_version", "value_set": list(et.schema_versions)},
            where=("event_type", et.name)))
        for fname, fs in et.payload.items():
            if fs.type == "enum":
                specs.append(ExpectationSpec(
                    "codes_known", "ExpectColumnValuesToBeInSet",
                    {"column": payload_column(fname), "value_set": list(fs.values)},
                    where=("event_type", et.name)))
    if known_instruments is not None:
        specs.append(ExpectationSpec("codes_known", "ExpectColumnValuesToBeInSet",
                                     {"column": "instrument_key", "value_set": sorted(known_instruments)}))

    # timestamps_plausible
    specs.append(ExpectationSpec(
        "timestamps_plausible", "ExpectColumnValuesToBeBetween",
        {"column": "occurred_at", "min_value": params.occurred_at_floor,
         "max_value": now + params.future_tolerance}))
    specs.append(ExpectationSpec(
        "timestamps_plausible", "ExpectColumnPairValuesAToBeGreaterThanB",
        {"column_A": "recorded_at", "column_B": "occurred_at", "or_equal": True,
         "ignore_row_if": "either_value_is_missing"}))
    return specs


def answer_specs(known_items: Iterable[str]) -> list[ExpectationSpec]:
    """The expectations of the answers suite (one row per item answer of a questionnaire event)."""
    return [
        ExpectationSpec("answers_in_range", "ExpectColumnValuesToBeInSet",
                        {"column": "item_key", "value_set": sorted(known_items)}),
        ExpectationSpec("answers_in_range", "ExpectColumnPairValuesAToBeGreaterThanB",
                        {"column_A": "answer", "column_B": "item_min", "or_equal": True,
                         "ignore_row_if": "either_value_is_missing"}),
        ExpectationSpec("answers_in_range", "ExpectColumnPairValuesAToBeGreaterThanB",
                        {"column_A": "item_max", "column_B": "answer", "or_equal": True,
                         "ignore_row_if": "either_value_is_missing"}),
        # A non-null answer that is not a number cannot be scored.
        ExpectationSpec("answers_in_range", "ExpectColumnValuesToNotBeNull",
                        {"column": "answer"}, where=("answer_given", True)),
    ]


# ---------------------------------------------------------------- reading the batch from DuckDB


def _table_exists(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> bool:
    row = con.execute(
        "select count(*) from duckdb_tables() where schema_name = ? and table_name = ?",
        [schema, table],
    ).fetchone()
    if row and row[0]:
        return True
    row = con.execute(
        "select count(*) from duckdb_views() where schema_name = ? and view_name = ?",
        [schema, table],
    ).fetchone()
    return bool(row and row[0])


def _frame(result: duckdb.DuckDBPyConnection) -> Any:
    """The result as a pandas DataFrame with the dtypes of `.df()`, via Arrow (~2-3x faster).

    Like `.df()`, integer and boolean columns with nulls become pandas' masked dtypes (Int64,
    boolean), so GX sees the same frame and failing keys read `line_number=12`, not `12.0`.
    """
    import pandas as pd
    import pyarrow as pa

    table = result.to_arrow_table()
    masked = {
        name: "boolean" if pa.types.is_boolean(col.type) else str(col.type).capitalize()
        for name, col in zip(table.column_names, table.columns, strict=True)
        if col.null_count and (pa.types.is_integer(col.type) or pa.types.is_boolean(col.type))
    }
    mapper = {pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
              pa.int64(): pd.Int64Dtype(), pa.bool_(): pd.BooleanDtype()}
    with_nulls = table.select(list(masked)).to_pandas(types_mapper=mapper.get) if masked else None
    # self_destruct frees each Arrow column once converted: the batch is not held twice.
    df = table.to_pandas(self_destruct=True)
    del table
    for name in masked:
        df[name] = with_nulls[name]
    return df


def instrument_items(con: duckdb.DuckDBPyConnection) -> Any | None:
    """seeds.instrument_items as a DataFrame (instrument, instrument_version, item, min, max), or None."""
    if not _table_exists(con, "seeds", "instrument_items"):
        return None
    return _frame(con.execute(
        "select instrument, instrument_version::varchar as instrument_version, item::varchar as item,"
        " min_value::double as min_value, max_value::double as max_value"
        " from seeds.instrument_items"
    ))


def instrument_keys(con: duckdb.DuckDBPyConnection) -> set[str] | None:
    """`instrument|version` of every defined instrument (seeds.instruments), or None.

    From seeds.instruments, not from the items: a total-only instrument (BDI-II) has no items.
    """
    if not _table_exists(con, "seeds", "instruments"):
        return None
    return {f"{i}|{v}" for i, v in con.execute(
        "select instrument, instrument_version::varchar from seeds.instruments").fetchall()}


@dataclass
class Batch:
    """The new events of one or more ingested files, ready for the suites."""

    file_ids: list[int]
    events: Any  # pandas DataFrame: envelope + payload_* columns + instrument_key
    answers: Any | None  # pandas DataFrame: one row per item answer, or None without seeds
    items: Any | None  # seeds.instrument_items, or None
    instruments: set[str] | None = None  # `instrument|version` of seeds.instruments, or None


def load_batch(con: duckdb.DuckDBPyConnection, file_ids: Sequence[int]) -> Batch:
    """Read the events of `file_ids` from raw.events (and their answers) as DataFrames."""
    ids = [int(i) for i in file_ids]
    fields = _payload_fields(load_contract())
    # One multi-path extraction parses each payload once (not once per field): ~2x faster.
    paths = ", ".join(f"'$.{f}'" for f in fields)
    payload_cols = ",\n".join(
        f"p[{i}] as {payload_column(f)}" for i, f in enumerate(fields, start=1)
    )
    events = _frame(con.execute(
        f"""
        select
            {", ".join(ENVELOPE_COLUMNS)},
            {payload_cols},
            case when event_type in {QUESTIONNAIRE_TYPES}
                then (payload ->> 'instrument') || '|' || (payload ->> 'instrument_version')
            end as instrument_key
        from (
            select *, json_extract_string(payload, [{paths}]) as p
            from raw.events
            where file_id in (select unnest(?::bigint[]))
        )
        """,
        [ids],
    ))
    items = instrument_items(con)
    answers = None
    if items is not None:
        answers = _frame(con.execute(
            f"""
            with

            questionnaires as (
                select file_id, line_number, payload
                from raw.events
                where file_id in (select unnest(?::bigint[]))
                    and event_type in {QUESTIONNAIRE_TYPES}
            ),

            answers as (
                -- One JSON parse per response (json_transform to a MAP), not one per item as
                -- with json_each: ~5x faster. A JSON null answer becomes SQL NULL here.
                select
                    file_id, line_number, instrument, instrument_version,
                    entry.key as item,
                    coalesce(json_type(entry.value) <> 'NULL', false) as answer_given,
                    -- a number only when JSON says so: true, false and "5" are not (the ingest
                    -- quarantines them; a cast would read them as 1, 0 and 5)
                    case when json_type(entry.value) in ('BIGINT', 'UBIGINT', 'DOUBLE')
                        then try_cast(entry.value as double) end as answer
                from (
                    select
                        file_id, line_number,
                        payload ->> 'instrument' as instrument,
                        payload ->> 'instrument_version' as instrument_version,
                        unnest(map_entries(json_transform(
                            payload -> 'answers', '"MAP(VARCHAR, JSON)"'))) as entry
                    from questionnaires
                )
            ),

            items as (
                select
                    instrument, instrument_version::varchar as instrument_version,
                    item::varchar as item, min_value::double as item_min,
                    max_value::double as item_max
                from seeds.instrument_items
            )

            select
                answers.file_id, answers.line_number,
                answers.instrument || '|' || answers.instrument_version || '|' || answers.item
                    as item_key,
                answers.answer_given, answers.answer, items.item_min, items.item_max
            from answers
            left join items using (instrument, instrument_version, item)
            """,
            [ids],
        ))
    return Batch(ids, events, answers, items, instrument_keys(con))


# ---------------------------------------------------------------- validating


@dataclass
class BatchValidation:
    """The batch suite's verdict per check, plus timing for the benchmark."""

    file_ids: list[int]
    rows: int
    checks: dict[str, CheckOutcome]
    severities: dict[str, str]
    seconds: float
    suite_results: list[SuiteResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks.values())

    @property
    def blocking_failures(self) -> list[str]:
        return [n for n, c in self.checks.items() if not c.passed and self.severities[n] == "ERROR"]


def _combine(
    results: Sequence[SuiteResult], params: BatchParams, notes: list[str], rows: int,
    file_ids: Sequence[int], started: float,
) -> BatchValidation:
    """Roll the suites' outcomes up into one verdict per check of quality/suites/batch.yaml."""
    checks: dict[str, CheckOutcome] = {}
    for name in params.severities:
        outs = [r.checks([name])[name] for r in results]
        outs = [o for o in outs if o.expectations_evaluated] or outs
        if not outs:
            checks[name] = CheckOutcome(name, True, 0, [], [], 0)
            continue
        checks[name] = CheckOutcome(
            check=name,
            passed=all(o.passed for o in outs),
            unexpected_count=sum(o.unexpected_count for o in outs),
            failing_expectations=[e for o in outs for e in o.failing_expectations],
            failing_keys=[k for o in outs for k in o.failing_keys][:MAX_FAILING_KEYS],
            expectations_evaluated=sum(o.expectations_evaluated for o in outs),
            errors=[e for o in outs for e in o.errors],
            failing_files=set().union(*(o.failing_files for o in outs)),
        )
    return BatchValidation(
        file_ids=list(file_ids),
        rows=rows,
        checks=checks,
        severities=dict(params.severities),
        seconds=time.perf_counter() - started,
        suite_results=list(results),
        notes=notes,
    )


def _known_codes(
    items: Any | None, notes: list[str], instruments: Iterable[str] | None = None
) -> tuple[set[str] | None, set[str] | None]:
    """Known `instrument|version|item` keys and `instrument|version` keys from the seeds.

    The instrument keys come from `instruments` (seeds.instruments) when given; deriving them
    from the items alone would miss the total-only instruments.
    """
    if items is None:
        notes.append("seeds.instrument_items not found: instrument codes and answers not checked")
        return None, None
    known_items = {f"{r.instrument}|{r.instrument_version}|{r.item}" for r in items.itertuples()}
    known_instruments = {k.rsplit("|", 1)[0] for k in known_items}
    if instruments is not None:
        known_instruments |= set(instruments)
    return known_items, known_instruments


def _validate_frames(
    events: Any, answers: Any | None, known_items: set[str] | None,
    known_instruments: set[str] | None, params: BatchParams, now: datetime,
) -> list[SuiteResult]:
    results = []
    if len(events):
        results.append(validate_frame(
            events, SUITE_NAME, batch_specs(params=params, known_instruments=known_instruments,
                                            now=now), KEY_COLUMNS, file_column="file_id"))
    if answers is not None and known_items is not None and len(answers):
        results.append(validate_frame(answers, ANSWERS_SUITE_NAME, answer_specs(known_items),
                                      KEY_COLUMNS, file_column="file_id"))
    return results


def validate_batch(
    events: Any,
    answers: Any | None = None,
    items: Any | None = None,
    *,
    instruments: Iterable[str] | None = None,
    params: BatchParams | None = None,
    now: datetime | None = None,
    file_ids: Sequence[int] = (),
) -> BatchValidation:
    """Validate one batch (the DataFrames of `load_batch`) with the batch suites; timing-friendly.

    `events` alone is enough (answers_in_range then passes with a note that nothing was checked).
    """
    params = params or default_params()
    started = time.perf_counter()
    notes: list[str] = []
    known_items, known_instruments = _known_codes(items, notes, instruments)
    results = _validate_frames(events, answers, known_items, known_instruments, params,
                               now or datetime.now(UTC))
    return _combine(results, params, notes, len(events), file_ids, started)


def merge_suite_results(parts: Sequence[SuiteResult]) -> SuiteResult:
    """One suite's results on several chunks as if validated at once: counts add up, keys in order.

    The GX result of the last chunk is kept (for Data Docs); the outcomes are those of the whole.
    """
    merged: dict[str, ExpectationOutcome] = {}
    for part in parts:
        for o in part.outcomes:
            label = o.spec.describe()
            m = merged.get(label)
            if m is None:
                merged[label] = ExpectationOutcome(o.spec, o.success, o.unexpected_count,
                                                   o.element_count, list(o.failing_keys), o.error,
                                                   set(o.failing_files))
                continue
            m.success = m.success and o.success
            m.unexpected_count += o.unexpected_count
            m.element_count += o.element_count
            m.error = m.error or o.error
            m.failing_keys += [k for k in o.failing_keys if k not in m.failing_keys]
            del m.failing_keys[MAX_FAILING_KEYS:]
            m.failing_files |= o.failing_files
    return SuiteResult(parts[-1].suite, sum(p.rows for p in parts), list(merged.values()),
                       gx_result=parts[-1].gx_result)


def plan_chunks(
    con: duckdb.DuckDBPyConnection, file_ids: Sequence[int], chunk_events: int = CHUNK_EVENTS
) -> list[list[int]]:
    """Group `file_ids` (in order) into chunks of at most `chunk_events` events.

    A chunk holds whole files, so a single file larger than the limit is a chunk of its own.
    """
    ids = sorted({int(i) for i in file_ids})
    counts = dict(con.execute(
        "select file_id, count(*) from raw.events where file_id in (select unnest(?::bigint[]))"
        " group by file_id",
        [ids],
    ).fetchall())
    chunks: list[list[int]] = []
    size = 0
    for fid in ids:
        n = int(counts.get(fid, 0))
        if chunks and size + n <= chunk_events:
            chunks[-1].append(fid)
            size += n
        else:
            chunks.append([fid])
            size = n
    return chunks


def validate_chunks(
    load: Callable[[Sequence[int]], Batch],
    chunks: Sequence[Sequence[int]],
    *,
    params: BatchParams | None = None,
    now: datetime | None = None,
) -> BatchValidation:
    """Validate the batch chunk by chunk; `load(file_ids)` reads one chunk (see `load_batch`).

    Only one chunk's DataFrames are alive at a time; counts add up across chunks and the failing
    keys are the first ones in file order, so the verdict equals validating the batch at once.
    One GX context serves every chunk (gx_runner keeps it per process).
    """
    params = params or default_params()
    now = now or datetime.now(UTC)  # one clock for every chunk
    started = time.perf_counter()
    notes: list[str] = []
    parts: dict[str, list[SuiteResult]] = {}
    rows = 0
    known: tuple[set[str] | None, set[str] | None] | None = None
    for chunk in chunks:
        batch = load(chunk)
        if known is None:  # the seeds are the same for every chunk
            known = _known_codes(batch.items, notes, batch.instruments)
        rows += len(batch.events)
        for r in _validate_frames(batch.events, batch.answers, *known, params, now):
            parts.setdefault(r.suite, []).append(r)
        del batch  # free this chunk's frames before reading the next
    results = [merge_suite_results(p) for p in parts.values()]
    file_ids = sorted({int(i) for c in chunks for i in c})
    return _combine(results, params, notes, rows, file_ids, started)


# ---------------------------------------------------------------- which files to validate

_VALIDATED_DDL = """
create schema if not exists quality;
create table if not exists quality.validated_batches (
    file_id bigint not null,
    run_id varchar not null,
    validated_at timestamptz not null,
    events bigint not null,
    passed boolean not null,
    blocking_failures varchar[]
);
comment on table quality.validated_batches is 'Each validation of an ingested file by the GX batch suite: a file whose last validation failed a blocking check stays pending until rejected (alliance reject-file).';
comment on column quality.validated_batches.file_id is 'The file (raw.ingested_files.file_id).';
comment on column quality.validated_batches.run_id is 'Dagster run that validated it.';
comment on column quality.validated_batches.validated_at is 'When.';
comment on column quality.validated_batches.events is 'Events of the file that were validated.';
comment on column quality.validated_batches.passed is 'False when a blocking check failed.';
comment on column quality.validated_batches.blocking_failures is 'Names of the blocking checks that failed.';
"""


def implausible_timestamps(con: duckdb.DuckDBPyConnection, params: BatchParams,
                           rejected: Iterable[int] = (), now: datetime | None = None
                           ) -> tuple[int, list[str]]:
    """Events of the whole log (rejected files aside) that fail `timestamps_plausible` now: the
    count and the first keys (file_id, line_number).

    The batch suite validates each file once (and again only while it has a blocking failure),
    so a WARN finding on an earlier file would read "passed" on the next run's new files while
    its events are still in the log; this cheap SQL form of the same rule keeps it visible.
    """
    if not _table_exists(con, "raw", "events"):
        return 0, []
    now = now or datetime.now(UTC)
    excluded = sorted({int(x) for x in rejected}) or [-1]
    n, keys = con.execute(
        """
        with bad as (
            select file_id, line_number from raw.events
            where file_id not in (select unnest(?::bigint[]))
                and (occurred_at < ?::timestamptz or occurred_at > ?::timestamptz
                     or occurred_at > recorded_at)
        )
        select (select count(*) from bad),
            (select list(k) from (select 'file_id=' || file_id || ' line_number=' || line_number
                                  as k from bad order by file_id, line_number limit ?))
        """,
        [excluded, params.occurred_at_floor, now + params.future_tolerance, MAX_FAILING_KEYS],
    ).fetchone()
    return int(n), list(keys or [])


def pending_file_ids(con: duckdb.DuckDBPyConnection) -> list[int]:
    """Files the batch suite must (re)check: never validated, or blocked at their last validation.

    A file whose last validation had a blocking failure stays pending, so the failure blocks every
    run (its events are in the append-only log) until the file is rejected
    (`alliance reject-file`, alliance.rejections) or a check parameter change lets it pass.
    Rejected files are never pending.
    """
    from alliance.rejections import ensure_rejections_table

    ensure_table(con, "quality", "validated_batches", _VALIDATED_DDL)
    if not _table_exists(con, "raw", "ingested_files"):
        return []
    ensure_rejections_table(con)
    rows = con.execute(
        """
        with last as (
            select file_id, arg_max(passed, validated_at) as passed
            from quality.validated_batches group by file_id
        )
        select f.file_id
        from raw.ingested_files as f
        left join last using (file_id)
        where coalesce(last.passed, false) = false
            and f.file_id not in (select file_id from raw.rejected_files)
        order by f.file_id
        """
    ).fetchall()
    return [int(r[0]) for r in rows]


def mark_validated(
    con: duckdb.DuckDBPyConnection, validation: BatchValidation, run_id: str
) -> None:
    """Record that the files of `validation` were validated (so they are not pending any more)."""
    ensure_table(con, "quality", "validated_batches", _VALIDATED_DDL)
    if not validation.file_ids:
        return
    counts = dict(con.execute(
        "select file_id, count(*) from raw.events where file_id in (select unnest(?::bigint[]))"
        " group by file_id",
        [validation.file_ids],
    ).fetchall())
    now = datetime.now(UTC)
    con.executemany(
        "insert into quality.validated_batches values (?, ?, ?, ?, ?, ?)",
        [
            # passed = nothing blocking failed (WARN findings do not fail a batch)
            [fid, run_id, now, int(counts.get(fid, 0)), not validation.blocking_failures,
             validation.blocking_failures]
            for fid in validation.file_ids
        ],
    )


def validate_files(
    con: duckdb.DuckDBPyConnection,
    file_ids: Sequence[int],
    *,
    params: BatchParams | None = None,
    now: datetime | None = None,
    chunk_events: int = CHUNK_EVENTS,
) -> BatchValidation:
    """Load and validate the events of `file_ids` in chunks; with no events GX is not imported."""
    ids = sorted({int(i) for i in file_ids})
    if not ids:
        params = params or default_params()
        return BatchValidation([], 0, {n: CheckOutcome(n, True, 0, [], [], 0)
                                       for n in params.severities},
                               dict(params.severities), 0.0, notes=["no new batch"])
    return validate_chunks(lambda chunk: load_batch(con, chunk), plan_chunks(con, ids, chunk_events),
                           params=params, now=now)
