"""Quality suites: each kind of violation fails its check with the right count and severity,
blocking failures stop downstream assets while warnings do not, and history accumulates."""


import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from dagster_duckdb import DuckDBResource

from quality.batch import pending_file_ids, plan_chunks, validate_files
from quality.checks import (
    GreatExpectationsResource,
    batch_checks,
    defs,
    marts_checks,
    relational_checks,
)
from quality.history import failing_checks, latest_results, record_check_result
from quality.marts import ModelSuite, validate_model
from quality.relational import CHECKS, run_check

T0 = datetime(2024, 3, 1, 9, tzinfo=UTC)
RAW_DDL = """
create schema if not exists raw;
create table if not exists raw.events (
    event_id varchar primary key, content_hash varchar, event_type varchar, schema_version int,
    occurred_at timestamptz, recorded_at timestamptz, source varchar, clinic_id varchar,
    patient_id varchar, therapist_id varchar, episode_id varchar, session_id varchar,
    payload json, file_id bigint, source_file varchar, line_number bigint, dropped_fields int);
create table if not exists raw.ingested_files (
    file_id bigint, path varchar, sha256 varchar, lines_read bigint, accepted bigint,
    duplicates bigint, quarantined bigint, dropped_fields bigint, status varchar,
    started_at timestamptz, finished_at timestamptz, recorded_at timestamptz);
create schema if not exists seeds;
create table if not exists seeds.instrument_items as
    select 'PHQ-9' as instrument, '1' as instrument_version, i::varchar as item,
           0.0 as min_value, 3.0 as max_value
    from range(1, 10) as t(i);
create table if not exists seeds.instruments as
    select 'PHQ-9' as instrument, '1' as instrument_version, 0.0 as total_min, 27.0 as total_max;
"""


def _pid(kind: str, i: int) -> str:
    return f"{kind}_{i:016x}"


def add_file(con: duckdb.DuckDBPyConnection, file_id: int, n: int = 20) -> None:
    """A clean file of n attended sessions and n PHQ-9 submissions (2n events)."""
    con.execute(RAW_DDL)
    rows = []
    for i in range(n):
        k = file_id * 1000 + i
        ids = {"pt": _pid("pt", k), "th": _pid("th", k), "ep": _pid("ep", k), "se": _pid("se", k)}
        at, rec = T0 + timedelta(days=i), T0 + timedelta(days=i, hours=1)
        rows.append([f"a{k}", "h", "session.attended", 1, at, rec, "test", "c1", ids["pt"],
                     ids["th"], ids["ep"], ids["se"],
                     json.dumps({"duration_minutes": 50, "modality": "video"}),
                     file_id, f"f{file_id}.ndjson", 2 * i + 1, 0])
        rows.append([f"q{k}", "h", "questionnaire.submitted", 1, at, rec, "test", "c1", ids["pt"],
                     None, ids["ep"], ids["se"],
                     json.dumps({"instrument": "PHQ-9", "instrument_version": "1",
                                 "respondent": "patient", "administered_at": at.isoformat(),
                                 "answers": {str(j): 1 for j in range(1, 10)}}),
                     file_id, f"f{file_id}.ndjson", 2 * i + 2, 0])
    con.executemany("insert into raw.events values (" + ", ".join(["?"] * 17) + ")", rows)
    con.execute("insert into raw.ingested_files values (?, ?, 'x', ?, ?, 0, 0, 0, 'ingested',"
                " now(), now(), now())", [file_id, f"f{file_id}.ndjson", 2 * n, 2 * n])


def inject(con: duckdb.DuckDBPyConnection, file_id: int, kind: str) -> None:
    """Break some rows of a file in one way (see VIOLATIONS for the expected counts)."""
    k = file_id * 1000
    sql = {
        # 2 attended sessions without their session
        "missing_required": f"update raw.events set session_id = null where event_id in ('a{k}', 'a{k + 1}')",
        # 1 raw identifier leaked instead of a pseudonym
        "raw_identifier": f"update raw.events set patient_id = 'Jane Doe 1970' where event_id = 'a{k + 2}'",
        # 3 unknown enum codes
        "unknown_code": f"update raw.events set payload = json_object('modality', 'telepathy') where event_id in ('a{k + 3}', 'a{k + 4}', 'a{k + 5}')",
        # 1 answer out of range and 1 unknown item
        "answer_range": f"update raw.events set payload = json_object('instrument', 'PHQ-9', 'instrument_version', '1', 'respondent', 'patient', 'administered_at', 'x', 'answers', json_object('1', 7, '2', null, '12', 1)) where event_id = 'q{k + 6}'",
        # 2 answers JSON does not call numbers: a boolean and a numeric string
        "answer_not_number": f"update raw.events set payload = json_object('instrument', 'PHQ-9', 'instrument_version', '1', 'respondent', 'patient', 'administered_at', 'x', 'answers', json_object('1', true, '2', '2', '3', 1)) where event_id = 'q{k + 9}'",
        # 1 event far in the future (also after its recorded_at: 2 findings), 1 before the floor
        "timestamps": f"update raw.events set occurred_at = case event_id when 'a{k + 7}' then '2099-01-01'::timestamptz else '1990-01-01'::timestamptz end where event_id in ('a{k + 7}', 'a{k + 8}')",
    }[kind]
    con.execute(sql)


# kind -> (check, unexpected count, severity)
VIOLATIONS = {
    "missing_required": ("required_fields_present", 2, "ERROR"),
    "raw_identifier": ("pseudonyms_well_formed", 1, "ERROR"),
    "unknown_code": ("codes_known", 3, "ERROR"),
    "answer_range": ("answers_in_range", 2, "ERROR"),
    "answer_not_number": ("answers_in_range", 2, "ERROR"),
    "timestamps": ("timestamps_plausible", 3, "WARN"),
}


def test_each_violation_fails_its_check_with_count_and_severity(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    add_file(con, 1)
    for kind in VIOLATIONS:
        inject(con, 1, kind)
    add_file(con, 2)  # a clean file: only the batch asked for is read
    assert pending_file_ids(con) == [1, 2]

    v = validate_files(con, [1])
    assert v.rows == 40
    # (kinds that share a check add up: answer_range and answer_not_number break two responses)
    expected: dict[str, int] = {}
    for check, count, _ in VIOLATIONS.values():
        expected[check] = expected.get(check, 0) + count
    assert expected["answers_in_range"] == 4
    for kind, (check, _count, severity) in VIOLATIONS.items():
        outcome = v.checks[check]
        assert not outcome.passed, kind
        assert outcome.unexpected_count == expected[check], (kind, outcome.failing_expectations)
        assert v.severities[check] == severity
        assert outcome.failing_keys and all(k.startswith("file_id=1 line_number=")
                                            for k in outcome.failing_keys)
    assert set(v.blocking_failures) == {c for c, _, s in VIOLATIONS.values() if s == "ERROR"}
    # the leaked identifier is never repeated in what a check reports
    assert "Jane" not in json.dumps([c.metadata() for c in v.checks.values()])

    clean = validate_files(con, [2])
    assert clean.passed and clean.rows == 40 and all(
        c.expectations_evaluated for c in clean.checks.values())


def test_total_only_instrument_is_a_known_code(tmp_path: Path) -> None:
    """A total-only instrument (no items, e.g. BDI-II) is known from seeds.instruments: its
    responses pass codes_known, while an instrument no definition knows still fails it."""
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    add_file(con, 1, n=3)
    con.execute("insert into seeds.instruments values ('BDI-II', '1', 0.0, 63.0)")
    total_only = {"instrument": "BDI-II", "instrument_version": "1", "respondent": "patient",
                  "administered_at": T0.isoformat(), "total": 17}
    con.execute("update raw.events set payload = ? where event_id = 'q1000'", [json.dumps(total_only)])
    v = validate_files(con, [1])
    assert v.checks["codes_known"].passed, v.checks["codes_known"].failing_expectations
    con.execute("update raw.events set payload = ? where event_id = 'q1001'",
                [json.dumps({**total_only, "instrument": "XYZ-1"})])
    v = validate_files(con, [1])
    assert not v.checks["codes_known"].passed and v.checks["codes_known"].unexpected_count == 1


def test_batch_in_chunks_counts_like_one_chunk(tmp_path: Path) -> None:
    """A batch split into several chunks (one file each) gives the verdict of one chunk."""
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    for fid in (1, 2, 3):
        add_file(con, fid)
    for kind in VIOLATIONS:
        inject(con, 1, kind)
    inject(con, 3, "raw_identifier")
    inject(con, 3, "answer_range")
    assert plan_chunks(con, [1, 2, 3], chunk_events=40) == [[1], [2], [3]]
    assert plan_chunks(con, [1, 2, 3], chunk_events=80) == [[1, 2], [3]]
    now = datetime.now(UTC)
    whole = validate_files(con, [1, 2, 3], now=now)
    split = validate_files(con, [1, 2, 3], now=now, chunk_events=40)
    assert split.rows == whole.rows == 120 and split.file_ids == whole.file_ids == [1, 2, 3]
    for name, w in whole.checks.items():
        c = split.checks[name]
        assert (c.passed, c.unexpected_count, c.expectations_evaluated) == (
            w.passed, w.unexpected_count, w.expectations_evaluated), name
        assert sorted(c.failing_expectations) == sorted(w.failing_expectations), name
        assert len(c.failing_keys) == len(w.failing_keys), name
        assert c.failing_files == w.failing_files, name
    # file 3's violations add to file 1's
    assert split.checks["pseudonyms_well_formed"].unexpected_count == 2
    assert split.checks["answers_in_range"].unexpected_count == 4 + 2
    assert split.checks["timestamps_plausible"].unexpected_count == 3
    # every file with a failing row, whatever the chunks
    for v in (whole, split):
        assert v.checks["pseudonyms_well_formed"].failing_files == {1, 3}
        assert v.checks["answers_in_range"].failing_files == {1, 3}
        assert v.checks["timestamps_plausible"].failing_files == {1}
    assert split.blocking_failures == whole.blocking_failures


def test_empty_batch_passes_without_reading(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    v = validate_files(con, [])
    assert v.passed and v.rows == 0 and v.notes == ["no new batch"]


# ---------------------------------------------------------------- Dagster: blocking and history


class Drop(dg.Config):
    violation: str = ""
    sessions: int = 10  # the file holds 2 x sessions events
    # more files in the same run, one per entry: the violation injected into it ("" for none)
    more_files: list[str] = []


def _graph(db: str) -> tuple[list[object], dict[str, object]]:
    @dg.asset(key=["raw", "events"])
    def raw_events(config: Drop, duckdb: DuckDBResource) -> dg.MaterializeResult:
        with duckdb.get_connection() as con:
            con.execute(RAW_DDL)
            file_id = int(con.execute("select coalesce(max(file_id), 0) + 1 from raw.ingested_files")
                          .fetchone()[0])
            ids = list(range(file_id, file_id + 1 + len(config.more_files)))
            for fid, violation in zip(ids, [config.violation, *config.more_files], strict=True):
                add_file(con, fid, n=config.sessions)
                if violation:
                    inject(con, fid, violation)
        return dg.MaterializeResult(metadata={"file_ids": dg.MetadataValue.json(ids)})

    @dg.asset(key=["serving", "snapshot_test"], deps=[raw_events])
    def snapshot() -> None:
        return None

    return [raw_events, snapshot, batch_checks()], {"duckdb": DuckDBResource(database=db),
                                                    "gx": GreatExpectationsResource()}


def _run(assets: list[object], resources: dict[str, object], instance: dg.DagsterInstance,
         violation: str, sessions: int = 10, more_files: tuple[str, ...] = ()
         ) -> dg.ExecuteInProcessResult:
    config = {"violation": violation, "sessions": sessions, "more_files": list(more_files)}
    return dg.materialize(assets, resources=resources, instance=instance, raise_on_error=False,
                          run_config={"ops": {"raw__events": {"config": config}}})


def _materialized(result: dg.ExecuteInProcessResult) -> set[str]:
    return {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}


def _evaluations(result: dg.ExecuteInProcessResult) -> dict[str, tuple[bool, str]]:
    return {e.check_name: (e.passed, e.severity.value)
            for e in (ev.event_specific_data for ev in result.all_events
                      if ev.event_type_value == "ASSET_CHECK_EVALUATION")}


def test_blocking_failure_stops_downstream_warning_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(tmp_path / "data"))
    db = str(tmp_path / "w.duckdb")
    assets, resources = _graph(db)
    instance = dg.DagsterInstance.ephemeral()

    warn = _run(assets, resources, instance, "timestamps")
    assert _evaluations(warn)["timestamps_plausible"] == (False, "WARN")
    assert warn.success and "serving/snapshot_test" in _materialized(warn)

    block = _run(assets, resources, instance, "raw_identifier")
    assert _evaluations(block)["pseudonyms_well_formed"] == (False, "ERROR")
    # the new batch's timestamps are fine, but file 1's implausible events are still in the log
    assert _evaluations(block)["timestamps_plausible"] == (False, "WARN")
    assert not block.success
    assert _materialized(block) == {"raw/events"}

    # history: 5 checks x 2 runs; what is failing now is the latest evaluation only
    with duckdb.connect(db, read_only=True) as con:
        per_run = con.execute("select run_id, count(*) from quality.check_results group by all"
                              ).fetchall()
        validated = con.execute("select file_id, passed from quality.validated_batches"
                                " order by file_id").fetchall()
    assert sorted(n for _, n in per_run) == [5, 5]
    assert validated == [(1, True), (2, False)]  # a WARN failure does not fail the batch
    failing = failing_checks(db)
    assert [(f["check_name"], f["severity"], f["unexpected_count"]) for f in failing] == [
        ("pseudonyms_well_formed", "ERROR", 1), ("timestamps_plausible", "WARN", 2)]
    assert failing[0]["run_id"] == block.run_id and failing[0]["failing_since"] is not None
    # failing since the first run, the one that ingested the implausible events
    first = {f["check_name"]: f for f in failing}["timestamps_plausible"]
    assert first["run_id"] == block.run_id and first["failing_since"] < failing[0]["failing_since"]
    assert "Jane" not in json.dumps(failing, default=str)

    # Data Docs were rendered under <data dir>/quality-docs, without the leaked identifier
    index = tmp_path / "data" / "quality-docs" / "site" / "index.html"
    assert index.exists()
    site = "".join(p.read_text(errors="ignore") for p in index.parent.rglob("*.html"))
    assert "raw_events_batch" in site and "Jane Doe" not in site


def test_second_small_file_validates_only_its_rows_and_catches_its_violation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The incremental case: after a large file, a run for one small file reads only that file."""
    monkeypatch.setenv("ALLIANCE_QUALITY_DOCS", "0")
    db = str(tmp_path / "w.duckdb")
    assets, resources = _graph(db)
    instance = dg.DagsterInstance.ephemeral()
    first = _run(assets, resources, instance, "", sessions=150)  # 300 events, clean
    assert first.success
    second = _run(assets, resources, instance, "raw_identifier", sessions=3)  # 6 events
    assert _evaluations(second)["pseudonyms_well_formed"] == (False, "ERROR")
    assert not second.success and _materialized(second) == {"raw/events"}
    with duckdb.connect(db, read_only=True) as con:
        rows = con.execute(
            "select check_name, passed, unexpected_count, details from quality.check_results"
            " where run_id = ? order by check_name", [second.run_id]).fetchall()
        validated = con.execute("select file_id, events, passed from quality.validated_batches"
                                " order by file_id").fetchall()
    assert len(rows) == 5
    for name, passed, unexpected, details in rows:
        d = json.loads(details)
        assert (d["rows_validated"], d["file_ids"]) == (6, "2"), name
        assert (passed, unexpected) == ((False, 1) if name == "pseudonyms_well_formed"
                                        else (True, 0)), name
    assert json.loads(dict((r[0], r[3]) for r in rows)["pseudonyms_well_formed"])[
        "failing_keys"] == "file_id=2 line_number=5"
    assert validated == [(1, 300, True), (2, 6, False)]


def test_history_failing_since_and_recovery(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "h.duckdb"))
    t = datetime(2025, 1, 1, tzinfo=UTC)
    for i, passed in enumerate([True, False, False]):
        record_check_result(con, run_id=f"r{i}", asset=["core", "sessions"], check_name="c",
                            passed=passed, severity="WARN", unexpected_count=0 if passed else 4,
                            details={"failing_keys": "se_00"}, evaluated_at=t + timedelta(days=i))
    (row,) = failing_checks(con)
    assert row["failing_since"] == t + timedelta(days=1) and row["run_id"] == "r2"
    assert row["details"] == {"failing_keys": "se_00"}
    record_check_result(con, run_id="r3", asset="core/sessions", check_name="c", passed=True,
                        severity=dg.AssetCheckSeverity.WARN, evaluated_at=t + timedelta(days=3))
    assert failing_checks(con) == []
    assert len(latest_results(con)) == 1
    assert failing_checks(tmp_path / "missing.duckdb") == []


# ---------------------------------------------------------------- marts and relational checks


MARTS_DDL = """
create schema if not exists core; create schema if not exists marts; create schema if not exists staging;
create table core.sessions as
    select 'se_' || lpad(i::varchar, 16, '0') as session_id, 'ep_' || lpad((i % 5)::varchar, 16, '0') as episode_id,
           'attended' as status, timestamptz '2024-03-01 10:00:00+00' + to_days(i::int) as session_at
    from range(10) as t(i);
create table core.episodes as
    select 'ep_' || lpad(i::varchar, 16, '0') as episode_id,
           case when i = 0 then timestamptz '2024-03-03 00:00:00+00' end as closed_at
    from range(5) as t(i);
create table core.questionnaire_scores as
    select 'r' || i as response_id, 'pt_' || lpad(i::varchar, 16, '0') as patient_id,
           'ep_' || lpad((i % 5)::varchar, 16, '0') as episode_id,
           case when i = 3 then 'se_ffffffffffffffff' else 'se_' || lpad(i::varchar, 16, '0') end as session_id,
           'PHQ-9' as instrument, '1' as instrument_version,
           case when i = 1 then 31.0 when i = 2 then -1.0 else 10.0 end as total
    from range(10) as t(i);
create table marts.fct_test as
    select 'c1' as clinic_id, date '2024-03-01' + to_months(i::int) as month,
           case when i = 0 then 120.0 else 50.0 end as completion_pct,
           case when i = 1 then 1.5 else 0.5 end as dropout_rate,
           case when i = 2 then 28.0 else 9.0 end as phq_total
    from range(4) as t(i)
    union all select 'c1', date '2024-03-01', 10.0, 0.1, 3.0;
"""


def test_marts_and_relational_checks(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / "m.duckdb"))
    add_file(con, 1, n=5)
    con.execute(MARTS_DDL)

    scores = validate_model(con, ModelSuite("core", "questionnaire_scores", totals=("total",),
                                            failing_keys=("patient_id",),
                                            checks=("totals_in_instrument_range",)))
    t = scores["totals_in_instrument_range"]
    assert not t.passed and t.unexpected_count == 2
    assert sorted(t.failing_keys) == [f"patient_id=pt_{i:016d}" for i in (1, 2)]

    fct = validate_model(con, ModelSuite("marts", "fct_test", key=("clinic_id", "month"),
                                         rate_ranges=(("_rate$", 0, 1), ("_pct$", 0, 100)),
                                         total_instruments=(("phq_total", "PHQ-9"),),
                                         totals=("phq_total",),
                                         checks=("rates_within_range", "one_row_per_key",
                                                 "totals_in_instrument_range")))
    assert fct["rates_within_range"].unexpected_count == 2  # 120 % and a rate of 1.5
    # "@column": each row's instrument is named by another column (SRS 0..40, WAI-SR 12..60)
    con.execute("create or replace table seeds.instruments as select instrument, "
                "instrument_version, total_min::double as total_min, total_max::double as total_max "
                "from seeds.instruments union all values ('SRS', '1', 0.0, 40.0), "
                "('WAI-SR', '1', 12.0, 60.0)")
    con.execute("create table marts.fct_alliance_like as select * from (values "
                "('se_1', 'SRS', 38.0), ('se_2', 'WAI-SR', 50.0), ('se_3', 'SRS', 50.0)) "
                "t(session_id, alliance_instrument, alliance_total)")
    per_row = validate_model(con, ModelSuite(
        "marts", "fct_alliance_like", totals=("alliance_total",),
        total_instruments=(("alliance_total", "@alliance_instrument"),),
        failing_keys=("session_id",), checks=("totals_in_instrument_range",)))
    assert per_row["totals_in_instrument_range"].failing_keys == ["session_id=se_3"]
    # a NULL key column (the network row of clinic_monthly has no clinic) is no location
    con.execute("create table marts.fct_network as select * from (values "
                "('clinic', 'c1', date '2024-03-01', 0.5), ('network', null, date '2024-03-01', 1.5))"
                " t(scope, clinic_id, month, dropout_rate)")
    net = validate_model(con, ModelSuite("marts", "fct_network",
                                         failing_keys=("scope", "clinic_id", "month"),
                                         rate_ranges=(("_rate$", 0, 1),),
                                         checks=("rates_within_range",)))["rates_within_range"]
    assert not net.passed and net.failing_keys == ["scope=network month=2024-03-01 00:00:00"]
    assert fct["totals_in_instrument_range"].unexpected_count == 1
    assert fct["one_row_per_key"].unexpected_count == 2 and not fct["one_row_per_key"].passed

    by_name = {c.name: c for c in CHECKS}
    orphan = run_check(con, by_name["questionnaires_on_known_sessions"])
    assert (orphan.unexpected_count, orphan.failing_keys) == (1, ["se_ffffffffffffffff"])
    late = run_check(con, by_name["no_attended_session_after_episode_end"])
    # episode 0 closed on 2024-03-03: its sessions 5 (03-06) is after, session 0 (03-01) is not
    assert (late.unexpected_count, late.failing_keys) == (1, [f"se_{5:016d}"])


def test_events_conserved_from_the_log_to_the_per_type_staging_views(tmp_path: Path) -> None:
    """Re-sent events are collapsed and reported, not lost; a staging view dropping, doubling or
    losing responses fails its own check while raw.events and staging.stg_events still agree."""
    from alliance.sqlrunner import discover_models, run_models
    from quality.relational import CONSERVATION_CHECKS, conservation_report

    con = duckdb.connect(str(tmp_path / "c.duckdb"))
    add_file(con, 1, n=5)
    # the producer re-sends session a1000 as attended a day later (latest wins in staging) and
    # retracts submission q1001 (its response is withdrawn)
    con.execute("insert into raw.events select * replace ('a1000-resend' as event_id, "
                "occurred_at + interval 1 day as occurred_at, 99 as line_number) "
                "from raw.events where event_id = 'a1000'")
    con.execute("insert into raw.events select * replace ('r1001' as event_id, "
                "'questionnaire.retracted' as event_type, "
                "json_object('retracts_event_id', 'q1001', 'reason', 'entered_in_error') as payload, "
                "100 as line_number) from raw.events where event_id = 'q1001'")
    staging = [m for m in discover_models() if m.startswith("staging.")]
    run_models(con, staging)

    report = {r["event_type"]: r for r in conservation_report(con)}
    assert {k: (v["raw_events"], v["staged_rows"], v["collapsed"], v["unaccounted"])
            for k, v in report.items()} == {
        "session.attended": (6, 5, 1, 0),  # 1 re-send collapsed into its session
        "questionnaire.submitted": (5, 5, 0, 0),
        "questionnaire.retracted": (1, 1, 0, 0),
        "questionnaire.responses": (5, 4, 1, 0),  # 1 chain withdrawn by the retraction
        **{t: (0, 0, 0, 0) for t in ("episode.opened", "episode.closed", "session.scheduled",
                                     "session.cancelled", "session.no_show", "therapist.assigned",
                                     "questionnaire.amended")}}

    def failing() -> dict[tuple[str, str], tuple[int, list[str]]]:
        out = {}
        for chk in CONSERVATION_CHECKS:
            o = run_check(con, chk)
            assert not o.errors, o.errors
            if not o.passed:
                out[(chk.asset[1], chk.name)] = (o.unexpected_count, o.failing_keys)
        return out

    assert len(CONSERVATION_CHECKS) == len(staging)  # one per staging view (stg_events too)
    assert failing() == {}

    def stg_events_agrees_with_raw() -> bool:
        # the old check's comparison: a view of the same table with the same filter
        return con.execute("""select count(*) = 0 from (
            select event_type, count(*) from raw.events group by all
            except select event_type, count(*) from staging.stg_events group by all)""").fetchone()[0]

    def swap(view: str, body: str) -> None:
        run_models(con, [f"staging.{view}"])  # start from the real view
        con.execute(f"create or replace table main.keep as select * from staging.{view}")
        kind = con.execute("select table_type from information_schema.tables "
                           "where table_schema = 'staging' and table_name = ?", [view]).fetchone()[0]
        con.execute(f"drop {'view' if kind == 'VIEW' else 'table'} staging.{view}")
        con.execute(f"create view staging.{view} as {body}")

    # a per-type view that loses a session (e.g. a bad join or filter)
    swap("stg_session_attended", "select * from main.keep where event_id <> 'a1002'")
    assert failing() == {("stg_session_attended", "events_conserved"): (1, ["session.attended"])}
    assert stg_events_agrees_with_raw()  # what the old check compared could not see it
    # ... or doubles one
    swap("stg_session_attended", "select * from main.keep union all "
                                 "select * from main.keep where event_id = 'a1003'")
    assert failing() == {("stg_session_attended", "events_conserved"): (1, ["session.attended"])}
    run_models(con, ["staging.stg_session_attended"])
    # a response lost between versions and current responses
    swap("stg_questionnaire_responses", "select * from main.keep limit 3")
    assert failing() == {("stg_questionnaire_responses", "responses_conserved"):
                         (1, ["questionnaire.responses"])}
    run_models(con, ["staging.stg_questionnaire_responses"])
    # an event type no staging view reads
    con.execute("insert into raw.events select * replace ('x1' as event_id, "
                "'session.teleported' as event_type) from raw.events where event_id = 'a1004'")
    assert failing() == {("stg_events", "events_conserved"): (1, ["session.teleported"])}


def test_checks_attach_to_the_project_graph(tmp_path: Path) -> None:
    from assets import ingest, sql_models
    from orchestration.resources import AllianceSettings

    resources = {"duckdb": DuckDBResource(database=str(tmp_path / "w.duckdb")),
                 "settings": AllianceSettings(data_dir=str(tmp_path))}
    assert "gx" in defs().resources  # the GX checks' resource comes with them
    merged = dg.Definitions.merge(ingest.defs(), sql_models.defs(), defs(),
                                  dg.Definitions(resources=resources))
    graph = merged.resolve_asset_graph()
    check_keys = {(k.asset_key.to_user_string(), k.name) for k in graph.asset_check_keys}
    assert ("raw/events", "pseudonyms_well_formed") in check_keys
    assert ("staging/stg_events", "events_conserved") in check_keys
    specs = {s.name: s for c in [batch_checks()] for s in c.check_specs}
    assert specs["pseudonyms_well_formed"].blocking and not specs["timestamps_plausible"].blocking
    assert all(s.blocking for c in marts_checks([ModelSuite("marts", "x", rate_ranges=(("_rate$", 0, 1),),
                                                            checks=("rates_within_range",))])
               for s in c.check_specs)
    assert {c.check_specs.__iter__().__next__().name for c in relational_checks()} == {
        c.name for c in CHECKS}



def test_checks_on_models_run_inside_the_models_step() -> None:
    """Checks on SQL models are the models step's own checks; only raw/* checks are steps."""
    from assets.sql_models import model_assets
    from orchestration.definitions import build_definitions

    project = build_definitions()
    model_keys = {k for a in model_assets() for k in a.keys}
    for checks in project.asset_checks or []:
        assert not {s.asset_key for s in checks.check_specs} & model_keys, checks.node_def.name
    (models,) = [a for a in project.assets if isinstance(a, dg.AssetsDefinition)
                 and dg.AssetKey(["staging", "stg_events"]) in a.keys]
    own = {(k.asset_key.to_user_string(), k.name) for k in models.check_keys}
    assert ("staging/stg_events", "events_conserved") in own
    assert any(key.startswith("marts/") for key, _ in own)  # the GX marts suites


def test_failing_inline_check_stops_descendants_and_publish(tmp_path: Path) -> None:
    """An ERROR check on a model stops the models built on it and everything after the step."""
    from assets.sql_models import models_asset
    from quality.checks import InlineCheck
    from quality.gx_runner import CheckOutcome

    sql_dir = tmp_path / "models"
    for schema, name, sql in (("core", "up", "select 'se_1' as id"),
                              ("marts", "down", "select * from core.up")):
        (sql_dir / schema).mkdir(parents=True, exist_ok=True)
        (sql_dir / schema / f"{name}.sql").write_text(sql)
    from alliance import sqlrunner

    models = sqlrunner.discover_models(sql_dir)
    up = dg.AssetKey(["core", "up"])
    failing = InlineCheck(
        asset=("core", "up"), severity="ERROR",
        specs=(dg.AssetCheckSpec("ids_known", asset=up, blocking=True),),
        requires=frozenset({("core", "up")}),
        run=lambda con: {"ids_known": CheckOutcome("ids_known", False, 1, ["unknown id"],
                                                   ["se_1"], 1)},
        label="test check")
    step = models_asset(models, inline_checks=[failing])

    @dg.asset(deps=[dg.AssetKey(["marts", "down"])])
    def publish_like() -> None:
        raise AssertionError("must not run after a failed blocking check")

    result = dg.materialize([step, publish_like], raise_on_error=False,
                            resources={"duckdb": DuckDBResource(database=str(tmp_path / "w.duckdb"))})
    assert not result.success
    materialized = {m.asset_key for m in result.get_asset_materialization_events()}
    assert materialized == {up}  # marts/down not built on the table that failed its check
    (evaluation,) = result.get_asset_check_evaluations()
    assert (evaluation.check_name, evaluation.passed) == ("ids_known", False)
    with duckdb.connect(str(tmp_path / "w.duckdb")) as con:  # and the history has it
        assert con.execute("select count(*) from quality.check_results where check_name = "
                           "'ids_known' and not passed").fetchone()[0] == 1


# ---------------------------------------------------------------- every check reaches the history


def test_column_tests_and_line_conservation_are_recorded(tmp_path: Path) -> None:
    """SQL model column tests and the ingest's line_conservation land in quality.check_results."""
    from assets.ingest import line_conservation
    from assets.sql_models import model_assets

    sql_dir = tmp_path / "sql" / "core"
    sql_dir.mkdir(parents=True)
    (sql_dir / "visits.sql").write_text("select * from raw.visits\n")
    (sql_dir / "visits.yml").write_text(
        "description: Visits.\nkey: session_id\ncolumns:\n"
        "  - name: session_id\n    description: Session.\n    tests: [unique, not_null]\n"
        "  - name: clinic_id\n    description: Clinic.\n    tests: [not_null]\n"
    )
    resources = {"duckdb": DuckDBResource(database=str(tmp_path / "w.duckdb"))}
    db = tmp_path / "w.duckdb"

    @dg.multi_asset(specs=[dg.AssetSpec(["raw", "visits"]), dg.AssetSpec(["raw", "events"])])
    def raw_tables(duckdb: DuckDBResource) -> Iterator[dg.MaterializeResult]:
        with duckdb.get_connection() as con:
            con.execute("""
                create schema if not exists raw;
                create or replace table raw.visits as
                    select * from (values ('se_01', 'c1'), ('se_02', null), ('se_02', null))
                    as t(session_id, clinic_id);
                create or replace table raw.ingested_files as select 1 as file_id,
                    'f.ndjson' as file_name, 10 as lines_read, 8 as accepted, 0 as duplicates,
                    1 as quarantined, 'ingested' as status;
                create or replace table raw.events as
                    select 'e' || i as event_id, 1 as file_id from range(8) as t(i);
                create or replace table raw.quarantine as
                    select 1 as file_id, n as line_number from range(9, 11) as t(n);
            """)
        yield dg.MaterializeResult(asset_key=["raw", "visits"])
        yield dg.MaterializeResult(asset_key=["raw", "events"])

    (visits,) = model_assets(tmp_path / "sql")
    instance = dg.DagsterInstance.ephemeral()
    first = dg.materialize([raw_tables, line_conservation, visits], resources=resources,
                           instance=instance, raise_on_error=False)
    assert _evaluations(first) == {
        # 10 read <> 8 + 0 + 1, and 1 quarantined <> 2 rows in raw.quarantine
        "line_conservation": (False, "ERROR"),
        "session_id__unique": (False, "ERROR"), "session_id__not_null": (True, "ERROR"),
        "clinic_id__not_null": (False, "ERROR")}

    failing = {(f["asset"], f["check_name"]): f for f in failing_checks(db)}
    assert set(failing) == {("core/visits", "session_id__unique"),
                            ("core/visits", "clinic_id__not_null"),
                            ("raw/events", "line_conservation")}
    assert all(f["run_id"] == first.run_id and f["severity"] == "ERROR" for f in failing.values())
    assert failing[("core/visits", "clinic_id__not_null")]["unexpected_count"] == 2
    assert failing[("core/visits", "session_id__unique")]["details"]["failing_keys"] == "se_02"
    assert failing[("raw/events", "line_conservation")]["unexpected_count"] == 2
    assert failing[("raw/events", "line_conservation")]["details"][
        "files_with_missing_quarantine_rows"] == 1
    assert [(r["asset"], r["check_name"]) for r in latest_results(db) if r["passed"]] == [
        ("core/visits", "session_id__not_null")]

    # the file's identity repaired: the next evaluation records the recovery
    with duckdb.connect(str(db)) as con:
        con.execute("update raw.ingested_files set quarantined = 2")
    again = dg.materialize([raw_tables, line_conservation, visits], resources=resources,
                           instance=instance, raise_on_error=False,
                           selection=dg.AssetSelection.checks(line_conservation))
    assert _evaluations(again) == {"line_conservation": (True, "ERROR")}
    assert ("raw/events", "line_conservation") not in {
        (f["asset"], f["check_name"]) for f in failing_checks(db)}
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("select count(*) from quality.check_results").fetchone()[0] == 5


def test_blocking_failure_holds_until_the_file_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blocked file stays blocked on later runs (its events are in the append-only log), even
    when the new file of that run is clean; rejecting it (alliance reject-file) releases the run."""
    from alliance.rejections import reject_files

    monkeypatch.setenv("ALLIANCE_QUALITY_DOCS", "0")
    db = str(tmp_path / "w.duckdb")
    assets, resources = _graph(db)
    instance = dg.DagsterInstance.ephemeral()
    assert _run(assets, resources, instance, "", sessions=3).success  # file 1
    blocked = _run(assets, resources, instance, "raw_identifier", sessions=3)  # file 2
    assert not blocked.success
    again = _run(assets, resources, instance, "", sessions=3)  # file 3 is clean; 2 still blocks
    assert _evaluations(again)["pseudonyms_well_formed"] == (False, "ERROR")
    assert not again.success and _materialized(again) == {"raw/events"}
    with duckdb.connect(db) as con:
        # file 3 was validated with file 2 and again without it: clean, it is not pending
        assert pending_file_ids(con) == [2]
        assert con.execute("select file_id, passed from quality.validated_batches where "
                           "file_id = 3").fetchall() == [(3, True)]
        [rejected] = reject_files(con, [2], "identifier_leak")
        assert (rejected.file_id, rejected.events) == (2, 6)
        assert pending_file_ids(con) == []
    released = _run(assets, resources, instance, "", sessions=3)  # file 4
    assert released.success and "serving/snapshot_test" in _materialized(released)
    with duckdb.connect(db) as con:
        assert pending_file_ids(con) == []


def test_a_blocking_failure_names_every_file_with_failing_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More files fail than the failing keys can show (5): every one is named for rejection, and
    the batch's clean files, validated once more without them, are no longer pending."""
    monkeypatch.setenv("ALLIANCE_QUALITY_DOCS", "0")
    db = str(tmp_path / "w.duckdb")
    assets, resources = _graph(db)
    instance = dg.DagsterInstance.ephemeral()
    # files 1-9 in one run: 1 and 9 clean, 2-8 (seven) each with a raw identifier
    blocked = _run(assets, resources, instance, "", sessions=4,
                   more_files=("raw_identifier",) * 7 + ("",))
    assert not blocked.success
    assert _evaluations(blocked)["pseudonyms_well_formed"] == (False, "ERROR")
    failing = {f["check_name"]: f for f in failing_checks(db)}["pseudonyms_well_formed"]
    assert failing["details"]["files_with_failing_rows"] == "2, 3, 4, 5, 6, 7, 8"
    assert len(failing["details"]["failing_keys"].split(", ")) == 5  # the keys stay a sample
    with duckdb.connect(db, read_only=True) as con:
        assert pending_file_ids(con) == [2, 3, 4, 5, 6, 7, 8]


def test_a_warning_on_an_earlier_file_stays_until_the_file_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch suite validates each file once; a later run with no new events, or with clean
    ones, must not record "passed" for timestamps_plausible while the implausible events are
    still in the log. Rejecting the file lets the next evaluation pass."""
    from alliance.rejections import reject_files

    monkeypatch.setenv("ALLIANCE_QUALITY_DOCS", "0")
    db = str(tmp_path / "w.duckdb")
    assets, resources = _graph(db)
    instance = dg.DagsterInstance.ephemeral()
    assert _evaluations(_run(assets, resources, instance, "timestamps", sessions=10))[
        "timestamps_plausible"] == (False, "WARN")
    later = _run(assets, resources, instance, "", sessions=10)  # a clean file
    assert _evaluations(later)["timestamps_plausible"] == (False, "WARN")
    failing = {f["check_name"]: f for f in failing_checks(db)}
    assert failing["timestamps_plausible"]["unexpected_count"] == 2  # rows of the whole log
    assert "file_id=1" in failing["timestamps_plausible"]["details"]["failing_keys"]
    with duckdb.connect(db) as con:
        reject_files(con, [1], "corrupt_export")
    cleared = _run(assets, resources, instance, "", sessions=10)
    assert _evaluations(cleared)["timestamps_plausible"] == (True, "WARN")
    assert "timestamps_plausible" not in {f["check_name"] for f in failing_checks(db)}


def test_scoped_pass_of_a_warning_test_does_not_clear_a_recorded_failure(tmp_path: Path) -> None:
    """An incremental build tests only its rebuilt rows: a warning-level test passing there does
    not overwrite the failure on record (failing_since kept); a whole-model pass does."""
    from alliance import sqlrunner
    from assets.sql_models import _recordable
    from quality.history import record_check_results

    model = sqlrunner.discover_models()["core.sessions"]
    warn = next(t for t in model.tests if t.severity == "warn")
    err = next(t for t in model.tests if t.severity == "error")
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    record_check_results(con, "run-1", [{"asset": list(model.key_path), "check_name": warn.check_name,
                                         "passed": False, "severity": "WARN", "unexpected_count": 1}])
    passed = [sqlrunner.TestResult(warn, 0, []), sqlrunner.TestResult(err, 0, [])]
    assert [r.test.check_name for r in _recordable(con, model, passed, "rebuilt_rows")] \
        == [err.check_name]
    assert [r.test.check_name for r in _recordable(con, model, passed, None)] \
        == [warn.check_name, err.check_name]
    failing_again = [sqlrunner.TestResult(warn, 2, ["se_1"])]
    assert _recordable(con, model, failing_again, "rebuilt_rows") == failing_again


def test_a_scoped_failure_is_counted_over_the_whole_model(tmp_path: Path) -> None:
    """A test failing on an incremental build's rebuilt rows is recorded with the whole model's
    count and keys: an older failing row outside the rebuilt ones is not dropped."""
    from alliance import sqlrunner
    from assets.sql_models import _whole_model_failures

    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    con.execute("create schema core")
    con.execute("create table core.t as select * from (values (1, 'a'), (2, null), (3, null)) v(id, x)")
    con.execute("create temp table rebuilt as select * from core.t where id = 3")
    sidecar = tmp_path / "core" / "t.yml"
    sidecar.parent.mkdir()
    (tmp_path / "core" / "t.sql").write_text("select 1 as id, 'a' as x")
    sidecar.write_text("key: id\ncolumns:\n  - name: x\n    tests: [{not_null: {severity: warn}}]\n")
    model = sqlrunner.discover_models(tmp_path)["core.t"]
    scoped = sqlrunner.run_tests(con, model, scope="rebuilt")
    assert [(r.failing, r.sample_keys) for r in scoped] == [(1, ["3"])]
    whole = _whole_model_failures(con, model, scoped, "rebuilt")
    assert [(r.failing, r.sample_keys) for r in whole] == [(2, ["2", "3"])]
    assert _whole_model_failures(con, model, scoped, None) == scoped  # a full build: as it is
