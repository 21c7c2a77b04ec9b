"""Tests for the dbt-like SQL runner, the staging/core models and their Dagster assets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import duckdb
import pytest
from dagster_duckdb import DuckDBResource

from alliance import sqlrunner
from alliance.sqlrunner import ModelError

RAW_EVENTS_DDL = """
create schema if not exists raw;
create table if not exists raw.events (
    event_id varchar primary key, content_hash varchar, event_type varchar, schema_version integer,
    occurred_at timestamptz, recorded_at timestamptz, source varchar, clinic_id varchar,
    patient_id varchar, therapist_id varchar, episode_id varchar, session_id varchar,
    payload json, file_id bigint, source_file varchar, line_number bigint, dropped_fields integer
);
"""

# The models this file covers (others' staging/core models need seeds and are tested elsewhere).
MODELS = ["staging.stg_events", "staging.stg_episode_opened", "staging.stg_episode_closed",
          "staging.stg_therapist_assigned", "staging.stg_session_scheduled",
          "staging.stg_session_attended", "staging.stg_session_cancelled",
          "staging.stg_session_no_show", "core.sessions", "core.episodes"]

# (event_id, type, occurred_at, recorded_at, episode, session, therapist, payload)
BATCH_1 = "2026-01-31 00:00:00+00"  # everything in January was recorded by this time
EVENTS = [
    ("e01", "episode.opened", "2026-01-01 09:00:00+00", "2026-01-02 00:00:00+00", "ep_a", None, None,
     {"age_group": "adult", "referral_source": "gp"}),
    ("e02", "therapist.assigned", "2026-01-01 09:00:00+00", "2026-01-02 00:00:00+00", "ep_a", None,
     "th_1", {"role": "primary"}),
    ("e03", "session.scheduled", "2026-01-01 10:00:00+00", "2026-01-02 00:00:00+00", "ep_a", "se_1",
     None, {"scheduled_for": "2026-01-05T10:00:00+01:00", "modality": "video"}),
    ("e04", "session.attended", "2026-01-05 09:00:00+00", "2026-01-06 00:00:00+00", "ep_a", "se_1",
     None, {"duration_minutes": 50, "modality": "in_person"}),
    ("e05", "session.scheduled", "2026-01-05 10:00:00+00", "2026-01-06 00:00:00+00", "ep_a", "se_2",
     None, {"scheduled_for": "2026-01-12T10:00:00+01:00"}),
    ("e06", "session.no_show", "2026-01-12 09:00:00+00", "2026-01-13 00:00:00+00", "ep_a", "se_2",
     None, {}),
    ("e07", "session.scheduled", "2026-01-12 10:00:00+00", "2026-01-13 00:00:00+00", "ep_a", "se_3",
     None, {"scheduled_for": "2026-01-19T10:00:00+01:00"}),
    ("e08", "session.cancelled", "2026-01-18 12:00:00+00", "2026-01-19 00:00:00+00", "ep_a", "se_3",
     None, {"cancelled_by": "patient", "late": True}),
    ("e09", "therapist.assigned", "2026-01-20 09:00:00+00", "2026-01-21 00:00:00+00", "ep_a", None,
     "th_2", {"role": "primary"}),
    ("e10", "therapist.assigned", "2026-01-21 09:00:00+00", "2026-01-22 00:00:00+00", "ep_a", None,
     "th_9", {"role": "secondary"}),
    ("e11", "session.scheduled", "2026-01-20 10:00:00+00", "2026-01-21 00:00:00+00", "ep_a", "se_4",
     None, {"scheduled_for": "2026-01-26T10:00:00+01:00", "modality": "phone"}),
    ("e12", "session.attended", "2026-01-26 09:00:00+00", "2026-01-27 00:00:00+00", "ep_a", "se_4",
     None, {}),
    # recorded in February: the no-show of se_2 is corrected to attended (a later occurred_at),
    # the episode closes, a second episode starts
    ("e13", "session.attended", "2026-01-12 09:30:00+00", "2026-02-03 00:00:00+00", "ep_a", "se_2",
     None, {"duration_minutes": 45}),
    ("e14", "episode.closed", "2026-02-01 09:00:00+00", "2026-02-02 00:00:00+00", "ep_a", None, None,
     {"reason": "planned"}),
    ("e15", "episode.opened", "2026-02-01 09:00:00+00", "2026-02-02 00:00:00+00", "ep_b", None, None,
     {"age_group": "adolescent"}),
    ("e16", "session.scheduled", "2026-02-01 10:00:00+00", "2026-02-02 00:00:00+00", "ep_b", "se_5",
     "th_3", {"scheduled_for": "2026-02-09T10:00:00+01:00"}),
]


def insert_events(con: duckdb.DuckDBPyConnection, events: list[tuple]) -> None:
    """Write rows straight into raw.events (the ingest is tested elsewhere)."""
    con.execute(RAW_EVENTS_DDL)
    patient = {"ep_a": "pt_a", "ep_b": "pt_b"}
    for i, (eid, etype, occ, rec, ep, se, th, payload) in enumerate(events, start=1):
        con.execute(
            "insert into raw.events values (?, ?, ?, 1, ?, ?, 'test', 'clinic_1', ?, ?, ?, ?, ?, 1, "
            "'test.ndjson', ?, 0)",
            [eid, f"hash_{eid}", etype, occ, rec, patient.get(ep, "pt_x"), th, ep, se,
             json.dumps(payload), i],
        )


@pytest.fixture(scope="module")
def built_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DuckDB file with the test events and every staging + core model built (read-only use)."""
    path = tmp_path_factory.mktemp("sqlrunner") / "warehouse.duckdb"
    with duckdb.connect(str(path)) as con:
        insert_events(con, EVENTS)
        results = sqlrunner.run_models(con, MODELS)
    # every column documented, every declared data_type right
    assert [w for r in results for w in r.warnings] == []
    return path


@pytest.fixture
def db_copy(built_db: Path, tmp_path: Path) -> Path:
    """A private copy of the built warehouse for tests that change it."""
    dst = tmp_path / "warehouse.duckdb"
    shutil.copy(built_db, dst)
    return dst


def write_model(root: Path, schema: str, name: str, sql: str, sidecar: str | None = None) -> Path:
    folder = root / schema
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.sql").write_text(sql)
    if sidecar is not None:
        (folder / f"{name}.yml").write_text(sidecar)
    return folder / f"{name}.sql"


# ---------------------------------------------------------------- parsing


def test_deps_are_parsed_and_ctes_excluded() -> None:
    sql = """
    with events as (select * from raw.events),
    scores as (select * from core.questionnaire_scores join seeds.instruments using (instrument)),
    joined as (select * from events join scores using (episode_id))
    select * from joined, range(3) as r
    where exists (select 1 from staging.stg_events as s where s.event_id = joined.event_id)
    """
    deps = sqlrunner.parse_deps(sql)
    assert set(deps) == {("raw", "events"), ("core", "questionnaire_scores"),
                         ("seeds", "instruments"), ("staging", "stg_events")}


def test_repo_models_discovered_with_deps_and_order() -> None:
    models = sqlrunner.discover_models()
    expected = set(MODELS)
    assert expected <= set(models)
    for fqn in expected:
        assert models[fqn].error is None, models[fqn].error
        assert models[fqn].tests, f"{fqn} has no tests"
    assert models["staging.stg_events"].deps == (("raw", "events"), ("raw", "rejected_files"))
    assert models["staging.stg_events"].materialized == "view"
    assert models["core.sessions"].materialized == "table"
    assert ("core", "sessions") in models["core.episodes"].deps
    order = sqlrunner.topological_order(models)
    assert order.index("staging.stg_events") < order.index("staging.stg_session_attended")
    assert order.index("core.sessions") < order.index("core.episodes")


def test_parse_error_names_file_and_line(tmp_path: Path) -> None:
    path = write_model(tmp_path, "core", "bad", "select\n  1 as a\nfrom raw.events\nwhere (\n")
    model = sqlrunner.load_model(path)
    assert model.error is not None and model.error.line == 4
    with pytest.raises(ModelError, match=r"bad\.sql:4: SQL syntax error"):
        sqlrunner.run_models(duckdb.connect(), sql_dir=tmp_path)


def test_cycle_is_reported(tmp_path: Path) -> None:
    write_model(tmp_path, "core", "a", "select * from core.b")
    write_model(tmp_path, "core", "b", "select * from core.a")
    with pytest.raises(ModelError, match="cycle"):
        sqlrunner.topological_order(sqlrunner.discover_models(tmp_path))


# ---------------------------------------------------------------- building the real models


def test_core_sessions_resolve_status_and_numbering(built_db: Path) -> None:
    with duckdb.connect(str(built_db), read_only=True) as con:
        rows = con.execute(
            "select session_id, status, session_number, appointment_number, therapist_id, "
            "modality, duration_minutes, session_month from core.sessions order by session_id"
        ).fetchall()
    import datetime as dt

    jan, feb = dt.date(2026, 1, 1), dt.date(2026, 2, 1)
    assert rows == [
        ("se_1", "attended", 1, 1, "th_1", "in_person", 50, jan),
        # the later attended event overrides the no-show
        ("se_2", "attended", 2, 2, "th_1", None, 45, jan),
        ("se_3", "cancelled", None, 3, "th_1", None, None, jan),
        # th_2 took over (primary) before this session; the secondary th_9 does not count
        ("se_4", "attended", 3, 4, "th_2", "phone", None, jan),
        # the session event names its therapist
        ("se_5", "scheduled", None, 1, "th_3", None, None, feb),
    ]


def test_core_episodes_contract(built_db: Path) -> None:
    with duckdb.connect(str(built_db), read_only=True) as con:
        cols = [r[0] for r in con.execute("describe core.episodes").fetchall()]
        rows = con.execute(
            "select episode_id, patient_id, therapist_id, age_group, end_reason, is_closed, "
            "sessions_scheduled, sessions_attended, sessions_cancelled, sessions_no_show, "
            "first_session_at < last_session_at from core.episodes order by episode_id"
        ).fetchall()
    for c in ["episode_id", "patient_id", "clinic_id", "therapist_id", "age_group", "opened_at",
              "closed_at", "end_reason", "is_closed", "sessions_scheduled", "sessions_attended",
              "sessions_cancelled", "sessions_no_show", "first_session_at", "last_session_at"]:
        assert c in cols
    assert rows == [
        ("ep_a", "pt_a", "th_2", "adult", "planned", True, 0, 3, 1, 0, True),
        ("ep_b", "pt_b", None, "adolescent", None, False, 1, 0, 0, 0, None),
    ]


def test_every_declared_test_passes_on_clean_data(built_db: Path) -> None:
    models = sqlrunner.discover_models()
    with duckdb.connect(str(built_db), read_only=True) as con:
        failures = [r for fqn in sqlrunner.select_models(models, MODELS)
                    for r in sqlrunner.run_tests(con, models[fqn]) if not r.passed]
    assert failures == []


def test_comments_visible_in_duckdb_catalog(built_db: Path) -> None:
    with duckdb.connect(str(built_db), read_only=True) as con:
        col = con.execute(
            "select comment from duckdb_columns() where schema_name = 'core' "
            "and table_name = 'sessions' and column_name = 'session_number'"
        ).fetchone()[0]
        table = con.execute("select comment from duckdb_tables() where schema_name = 'core' "
                            "and table_name = 'episodes'").fetchone()[0]
        view = con.execute("select comment from duckdb_views() where schema_name = 'staging' "
                           "and view_name = 'stg_events'").fetchone()[0]
        undocumented = con.execute(
            "select table_name, column_name from duckdb_columns() where schema_name || '.' || "
            "table_name in ? and comment is null", [MODELS]
        ).fetchall()
    assert col.startswith("1..n over attended sessions")
    assert table.startswith("One row per episode")
    assert "as-of" in view
    assert undocumented == []


def test_rerun_is_idempotent_and_switches_materialization(db_copy: Path, tmp_path: Path) -> None:
    with duckdb.connect(str(db_copy)) as con:
        before = con.execute("select * from core.sessions order by session_id").fetchall()
        results = sqlrunner.run_models(con, ["core.sessions", "core.episodes"])
        assert [r.model.fqn for r in results] == ["core.sessions", "core.episodes"]
        assert con.execute("select * from core.sessions order by session_id").fetchall() == before
        # a model moved from view to table (and back) replaces the old object
        sql_dir = tmp_path / "models"
        write_model(sql_dir, "staging", "stg_events", "select event_id from raw.events",
                    "materialized: table\ncolumns:\n  - name: event_id\n    description: id\n")
        sqlrunner.run_models(con, sql_dir=sql_dir)
        sqlrunner.run_models(con, sql_dir=sql_dir)
        kind = con.execute("select count(*) from duckdb_tables() where schema_name = 'staging' "
                           "and table_name = 'stg_events'").fetchone()[0]
        assert kind == 1
        assert con.execute("select comment from duckdb_columns() where schema_name = 'staging' "
                           "and table_name = 'stg_events'").fetchone()[0] == "id"


def test_as_of_variable_reproduces_the_past(db_copy: Path) -> None:
    with duckdb.connect(str(db_copy)) as con:
        now = con.execute("select count(*) from staging.stg_events").fetchone()[0]
        con.execute(f"set variable as_of = '{BATCH_1}'")
        then = con.execute("select count(*) from staging.stg_events").fetchone()[0]
        assert (now, then) == (len(EVENTS), 12)
        sqlrunner.run_models(con, ["core.sessions", "core.episodes"])
        rows = con.execute("select session_id, status from core.sessions order by 1").fetchall()
        assert ("se_2", "no_show") in rows and all(r[0] != "se_5" for r in rows)
        ep = con.execute("select is_closed, sessions_no_show from core.episodes").fetchall()
        assert ep == [(False, 1)]


# ---------------------------------------------------------------- errors and tests


def test_duckdb_error_names_file_and_line(tmp_path: Path) -> None:
    sql = "-- a comment line\nwith\n\nevents as (select * from raw.events)\n\nselect nope from events\n"
    write_model(tmp_path, "core", "broken", sql)
    con = duckdb.connect()
    con.execute(RAW_EVENTS_DDL)
    with pytest.raises(ModelError) as info:
        sqlrunner.run_models(con, sql_dir=tmp_path)
    assert info.value.line == 6
    assert "broken.sql:6: Binder Error" in str(info.value) and "nope" in str(info.value)
    # nothing half-built is left behind
    assert con.execute("select count(*) from duckdb_tables() where table_name = 'broken'"
                       ).fetchone()[0] == 0


def test_sidecar_column_mismatch_is_an_error(tmp_path: Path) -> None:
    write_model(tmp_path, "core", "m", "select 1 as a",
                "columns:\n  - name: a\n    description: x\n  - name: b\n    description: y\n")
    with pytest.raises(ModelError, match=r"m\.yml: sidecar documents columns .*\['b'\]"):
        sqlrunner.run_models(duckdb.connect(), sql_dir=tmp_path)


def test_unquoted_description_with_a_comma_is_an_error(tmp_path: Path) -> None:
    # YAML reads "Of those, paired" in a {...} entry as description "Of those" plus a key "paired"
    path = write_model(tmp_path, "core", "m", "select 1 as a",
                       "columns:\n  - name: x\n  - {name: a, description: Of those, paired}\n")
    err = sqlrunner.load_model(path).error
    assert err is not None and err.line == 3
    assert "column 'a': unknown key(s) ['paired']" in str(err) and "quote a description" in str(err)


def test_bad_sidecar_test_names_line(tmp_path: Path) -> None:
    path = write_model(tmp_path, "core", "m", "select 1 as a",
                       "columns:\n  - name: a\n    tests:\n      - not_null\n      - frobnicate\n")
    err = sqlrunner.load_model(path).error
    assert err is not None and err.line == 5 and "unknown test 'frobnicate'" in str(err)


def test_column_tests_catch_injected_violations(db_copy: Path) -> None:
    models = sqlrunner.discover_models()
    bad = [
        # an unknown modality and a duration out of range for an attended session
        ("x1", "session.attended", "2026-01-28 09:00:00+00", "2026-01-29 00:00:00+00", "ep_a",
         "se_9", None, {"modality": "carrier_pigeon", "duration_minutes": 900}),
        # a session of an episode nobody opened
        ("x2", "session.scheduled", "2026-01-28 09:00:00+00", "2026-01-29 00:00:00+00", "ep_zz",
         "se_8", None, {"scheduled_for": "2026-02-02T10:00:00+01:00"}),
    ]
    with duckdb.connect(str(db_copy)) as con:
        insert_events(con, bad)
        sqlrunner.run_models(con, ["core.sessions", "core.episodes"])
        attended = {r.test.check_name: r for r in
                    sqlrunner.run_tests(con, models["staging.stg_session_attended"])}
        sessions = {r.test.check_name: r for r in sqlrunner.run_tests(con, models["core.sessions"])}
    assert attended["modality__accepted_values"].failing == 1
    assert attended["modality__accepted_values"].sample_keys == ["se_9"]
    assert attended["duration_minutes__expression"].failing == 1
    rel = sessions["episode_id__relationships"]
    assert (rel.failing, rel.sample_keys, rel.test.severity) == (1, ["se_8"], "warn")
    assert sessions["session_id__unique"].passed


def test_unique_and_not_null_and_combination(tmp_path: Path) -> None:
    write_model(
        tmp_path, "marts", "m",
        "select * from (values ('k1', 1), ('k1', 2), (null, 3)) as t(id, n)",
        "columns:\n  - name: id\n    description: key\n    tests: [unique, not_null]\n"
        "  - name: n\n    description: n\n    tests:\n      - {expression: 'n < 3', severity: warn}\n"
        "tests:\n  - unique_combination: [id, n]\n",
    )
    con = duckdb.connect()
    sqlrunner.run_models(con, sql_dir=tmp_path)
    model = sqlrunner.discover_models(tmp_path)["marts.m"]
    res = {r.test.check_name: (r.failing, r.sample_keys) for r in sqlrunner.run_tests(con, model)}
    assert res == {"id__unique": (1, ["k1"]), "id__not_null": (1, []),
                   "n__expression": (1, []), "id__n__unique_combination": (0, [])}
    with pytest.raises(ModelError, match="id__unique"):
        sqlrunner.run_models(con, sql_dir=tmp_path, tests=True)
    # the failed build's state is forgotten: the next build is a full one that tests every row
    assert "marts.m" not in sqlrunner.read_state(con)


# ---------------------------------------------------------------- Dagster


def test_dagster_materializes_staging_and_core_with_checks(tmp_path: Path) -> None:
    from assets import sql_models

    db = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(db)) as con:
        insert_events(con, EVENTS)
    (models,) = sql_models.model_assets()  # every model, one subsettable step
    sessions_key = dg.AssetKey(["core", "sessions"])
    wanted = [dg.AssetKey(m.split(".")) for m in MODELS]
    assert set(wanted) <= set(models.keys)
    assert dg.AssetKey(["staging", "stg_session_attended"]) in models.asset_deps[sessions_key]
    spec = models.specs_by_key[sessions_key]
    assert spec.group_name == "core" and spec.kinds >= {"duckdb"}
    assert "session_number" in [c.name for c in spec.metadata["dagster/column_schema"].columns]
    check_specs = {c.name: c for c in models.check_specs if c.asset_key == sessions_key}
    assert check_specs["session_id__unique"].blocking
    assert not check_specs["episode_id__relationships"].blocking  # warn severity

    result = dg.materialize([models], selection=wanted,
                            resources={"duckdb": DuckDBResource(database=str(db))})
    assert result.success
    mats = {m.asset_key: m for m in result.get_asset_materialization_events()}
    assert set(mats) == set(wanted)  # the subset, nothing else
    meta = mats[sessions_key].materialization.metadata
    assert meta["dagster/row_count"].value == 5
    evals = result.get_asset_check_evaluations()
    assert len(evals) == sum(1 for c in models.check_keys if c.asset_key in wanted)
    assert all(e.passed for e in evals), [e.check_name for e in evals if not e.passed]


def test_dagster_blocking_check_stops_downstream(tmp_path: Path) -> None:
    from assets import sql_models

    sql_dir = tmp_path / "models"
    write_model(sql_dir, "core", "up", "select 'se_1' as id union all select 'se_1'",
                "columns:\n  - name: id\n    description: key\n    tests: [unique]\n")
    write_model(sql_dir, "marts", "down", "select * from core.up")
    db = tmp_path / "w.duckdb"
    result = dg.materialize(sql_models.model_assets(sql_dir),
                            resources={"duckdb": DuckDBResource(database=str(db))},
                            raise_on_error=False)
    failed = [e for e in result.get_asset_check_evaluations() if not e.passed]
    assert [(e.check_name, e.metadata["failing_keys"].value) for e in failed] == [("id__unique",
                                                                                   "se_1")]
    materialized = {m.asset_key for m in result.get_asset_materialization_events()}
    assert dg.AssetKey(["marts", "down"]) not in materialized
    # an incremental next run would otherwise re-test only new keys and let the bad rows through
    with duckdb.connect(str(db)) as con:
        assert "core.up" not in sqlrunner.read_state(con)


def test_set_as_of_rejects_what_is_not_a_timestamp() -> None:
    with pytest.raises(ValueError, match="not a timestamp"):
        sqlrunner.set_as_of(duckdb.connect(), "last tuesday")


def test_discovered_models_follow_edits_to_their_files(tmp_path: Path) -> None:
    """discover_models is parsed once per process, but an edited SQL or sidecar file is re-read."""
    path = write_model(tmp_path, "core", "m", "select 1 as a")
    assert sqlrunner.discover_models(tmp_path)["core.m"].sql.strip() == "select 1 as a"
    path.write_text("select 1 as a, 2 as b")
    assert "2 as b" in sqlrunner.discover_models(tmp_path)["core.m"].sql
    (tmp_path / "core" / "m.yml").write_text("description: Now documented.\n")
    assert sqlrunner.discover_models(tmp_path)["core.m"].description == "Now documented."
    write_model(tmp_path, "marts", "n", "select * from core.m")
    assert set(sqlrunner.discover_models(tmp_path)) == {"core.m", "marts.n"}


def test_models_cut_months_in_utc_whatever_the_session_time_zone(tmp_path: Path) -> None:
    """20:00 UTC on 31 May is 1 June in Auckland: a build must still put it in May."""
    write_model(tmp_path, "core", "m",
                "select date_trunc('month', '2026-05-31T20:00:00Z'::timestamptz)::date as month",
                "columns:\n  - name: month\n    description: The month.\n")
    con = duckdb.connect()
    con.execute("set TimeZone = 'Pacific/Auckland'")  # what TZ=Pacific/Auckland gives DuckDB
    sqlrunner.run_models(con, sql_dir=tmp_path)
    assert str(con.execute("select month from core.m").fetchone()[0]) == "2026-05-01"
