"""Incremental SQL models give exactly the rows a full rebuild gives.

One simulated clinic network (data set A) is ingested and built fully. Then two more batches
arrive: B1 = the simulator's last days (new events, amendments, retractions for existing
episodes) plus a hand-made file of corrections that point at A (an amendment and retractions
of A's questionnaires, a late questionnaire, a therapist reassignment, an episode closing, a
no-show corrected to attended, and an amendment whose submission has not arrived yet); B2 = that
late submission. After each batch the models build incrementally. A second warehouse gets the
same raw.events (A + B1 + B2, byte for byte: recorded_at is set at ingest) and the same seeds, and
builds everything fully: every model must hold the same rows. A third does the same with A + B1
only and is compared with the incremental warehouse as it was after B1 (the orphan amendment
counts and is scored before its submission arrives).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import duckdb
import pytest
from table_rows import table_rows

from alliance import sqlrunner
from alliance.config import SQL_DIR

KEY = b"incremental-test-key-0123456789abcdef012345"
LAST_DAYS = 8  # the simulator's last days form batch B1


def _events(path: Path) -> list[dict]:
    """The well-formed events of a landing file (the simulator mixes in about 1% broken lines)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if isinstance(e, dict) and isinstance(e.get("payload"), dict) and e.get("event_id"):
            out.append(e)
    return out


def _new_id() -> str:
    return str(uuid.uuid4())


def _corrections(a_files: list[Path]) -> tuple[list[dict], list[dict]]:
    """Hand-made events pointing at data set A: (batch B1 extras, batch B2)."""
    events = [e for f in a_files for e in _events(f) if isinstance(e, dict) and "event_type" in e]
    by_type: dict[str, list[dict]] = {}
    for e in events:
        by_type.setdefault(e["event_type"], []).append(e)
    subs = [e for e in by_type["questionnaire.submitted"]
            if e["payload"].get("instrument") == "PHQ-9" and e["payload"].get("answers")]
    amended, retracted = subs[3], subs[10]
    closed = {e["episode_id"] for e in by_type["episode.closed"]}
    open_eps = [e for e in by_type["episode.opened"] if e["episode_id"] not in closed]
    reassigned, to_close = open_eps[0], open_eps[1]
    no_show = by_type["session.no_show"][0]
    later = "2099-01-01T00:00:00+00:00"  # sorts after everything: wins every "latest" rule

    def like(src: dict, event_type: str, payload: dict, **env: object) -> dict:
        e = {k: v for k, v in src.items() if k not in ("payload",)}
        e.update(event_id=_new_id(), event_type=event_type, schema_version=1, payload=payload)
        e.update(env)
        return e

    b1 = [
        like(amended, "questionnaire.amended",
             {**amended["payload"], "answers": {k: 0 for k in amended["payload"]["answers"]},
              "amends_event_id": amended["event_id"]}, occurred_at=later),
        {"event_id": _new_id(), "event_type": "questionnaire.retracted", "schema_version": 1,
         "occurred_at": later, "source": "simulator", "clinic_id": retracted["clinic_id"],
         "patient_id": retracted["patient_id"],
         "payload": {"retracts_event_id": retracted["event_id"], "reason": "entered_in_error"}},
        # a late questionnaire: happened at an old session, recorded now
        like(subs[20], "questionnaire.submitted", dict(subs[20]["payload"])),
        # a new primary therapist half-way through an open episode (a late event too)
        like(reassigned, "therapist.assigned", {"role": "primary"},
             therapist_id="THR-LATE-01", occurred_at=reassigned["occurred_at"]),
        like(to_close, "episode.closed", {"reason": "planned"}, occurred_at=later),
        like(no_show, "session.attended", {"duration_minutes": 50, "modality": "video"},
             occurred_at=later),
    ]
    if by_type.get("questionnaire.amended"):  # retract one of A's amendments only
        target = by_type["questionnaire.amended"][0]
        b1.append({"event_id": _new_id(), "event_type": "questionnaire.retracted",
                   "schema_version": 1, "occurred_at": later, "source": "simulator",
                   "clinic_id": target["clinic_id"], "patient_id": target["patient_id"],
                   "payload": {"retracts_event_id": target["event_id"], "reason": "other"}})
    # an amendment that arrives before its submission (B2): an orphan until then
    late_sub = like(subs[30], "questionnaire.submitted", dict(subs[30]["payload"]))
    b1.append(like(late_sub, "questionnaire.amended",
                   {**late_sub["payload"], "answers": {k: 1 for k in late_sub["payload"]["answers"]},
                    "amends_event_id": late_sub["event_id"]}, occurred_at=later))
    return b1, [late_sub]


def _write(path: Path, events: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def _seed(con: duckdb.DuckDBPyConnection) -> None:
    from alliance.instruments import load_instruments, write_parameters_table, write_seed_tables

    write_seed_tables(con, load_instruments())
    write_parameters_table(con, SQL_DIR / "parameters.yml")


def _ingest(con: duckdb.DuckDBPyConnection, files: list[Path], tmp: Path) -> None:
    from alliance.ingest import ingest_files

    for res in ingest_files(con, files, KEY, quarantine_dir=tmp / "quarantine"):
        assert res.accepted > 0 or res.duplicates > 0, res


def _build_checked(con: duckdb.DuckDBPyConnection, **kw: object) -> dict[str, sqlrunner.BuildResult]:
    """Build every model and run its tests; error-level failures fail the test."""
    models = sqlrunner.discover_models(kw.pop("sql_dir", None))
    out = {}
    for fqn in sqlrunner.topological_order(models):
        built = sqlrunner.build_model(con, models[fqn], **kw)
        failed = [(r.test.check_name, r.failing, r.error)
                  for r in sqlrunner.run_tests(con, models[fqn], scope=built.test_scope)
                  if not r.passed and r.test.severity == "error"]
        assert not failed, (fqn, built.mode, failed)
        out[fqn] = built
    return out


@pytest.fixture(scope="module")
def warehouses(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from alliance.simulation import simulate

    tmp = tmp_path_factory.mktemp("incremental")
    simulate(tmp / "landing", patients=160, months=6, seed=11, truth_path=tmp / "truth.json")
    files = sorted((tmp / "landing").glob("*.ndjson"))
    a_files, b_files = files[:-LAST_DAYS], files[-LAST_DAYS:]
    extra_b1, b2 = _corrections(a_files)
    extra = _write(tmp / "corrections-b1.ndjson", extra_b1)
    late = _write(tmp / "corrections-b2.ndjson", b2)

    inc = duckdb.connect(str(tmp / "incremental.duckdb"))
    _ingest(inc, a_files, tmp)
    _seed(inc)
    first = _build_checked(inc, incremental=True)  # no state yet: full
    _ingest(inc, [*b_files, extra], tmp)
    round1 = _build_checked(inc, incremental=True)
    orphans_after_b1 = inc.execute(
        "select count(*) from staging.stg_questionnaire_versions where is_orphan").fetchone()[0]
    full_b1 = _full_copy(inc, tmp / "full-b1.duckdb")
    after_b1 = {fqn: table_rows(inc, *fqn.split(".")) for fqn in sqlrunner.discover_models()}
    _ingest(inc, [late], tmp)
    round2 = _build_checked(inc, incremental=True)
    full = _full_copy(inc, tmp / "full.duckdb")
    return {"tmp": tmp, "inc": inc, "full": full, "full_b1": full_b1, "after_b1": after_b1,
            "first": first, "round1": round1, "round2": round2,
            "orphans_after_b1": orphans_after_b1, "late_submission": b2[0]["event_id"]}


def _full_copy(inc: duckdb.DuckDBPyConnection, path: Path) -> duckdb.DuckDBPyConnection:
    """A warehouse with inc's raw.events as they are now, its models built fully."""
    inc.execute(f"attach '{path}' as dst")
    inc.execute("create schema dst.raw")
    inc.execute("create table dst.raw.events as select * from raw.events")
    inc.execute("detach dst")
    full = duckdb.connect(str(path))
    _seed(full)
    _build_checked(full, incremental=False)
    return full


def test_batches_exercise_the_hard_cases(warehouses):
    inc = warehouses["inc"]
    counts = dict(inc.execute(
        "select event_type, count(*) from raw.events where file_id > (select max(file_id) "
        f"- {LAST_DAYS + 2} from raw.events) group by all").fetchall())
    for t in ("questionnaire.amended", "questionnaire.retracted", "therapist.assigned",
              "episode.closed", "session.attended", "questionnaire.submitted"):
        assert counts.get(t, 0) > 0, (t, counts)
    # the early amendment was an orphan after B1 and found its submission in B2
    assert warehouses["orphans_after_b1"] >= 1
    assert inc.execute("select count(*) from staging.stg_questionnaire_versions "
                       "where is_orphan").fetchone()[0] == warehouses["orphans_after_b1"] - 1


def test_builds_were_incremental(warehouses):
    assert all(b.mode == "full" for b in warehouses["first"].values())
    for rnd in ("round1", "round2"):
        built = warehouses[rnd]
        for fqn in ("staging.stg_questionnaire_versions", "staging.stg_questionnaire_responses",
                    "core.sessions", "core.episodes", "core.questionnaire_item_answers",
                    "core.questionnaire_scores", "core.questionnaire_subscale_scores",
                    "marts.fct_outcome_sessions", "marts.fct_sudden_gains"):
            b = built[fqn]
            assert b.mode == "incremental", (rnd, fqn, b.reason)
            assert b.test_scope is not None
        # network-wide statistics: always rebuilt whole
        assert built["marts.fct_episode_outcomes"].mode == "full"
    # a small batch touches a small share of the episodes
    b = warehouses["round2"]["core.episodes"]
    assert 1 <= b.keys_rebuilt < b.row_count / 5


@pytest.mark.parametrize("fqn", [f for f, m in sqlrunner.discover_models().items()])
def test_incremental_equals_full_rebuild(warehouses, fqn):
    schema, name = fqn.split(".")
    inc_rows = table_rows(warehouses["inc"], schema, name)
    full_rows = table_rows(warehouses["full"], schema, name)
    assert len(inc_rows) == len(full_rows), fqn
    assert inc_rows == full_rows, fqn
    # and as it was after B1, while the orphan amendment waited for its submission
    b1_rows = table_rows(warehouses["full_b1"], schema, name)
    assert len(warehouses["after_b1"][fqn]) == len(b1_rows), fqn
    assert warehouses["after_b1"][fqn] == b1_rows, fqn


def test_orphan_amendment_is_scored_before_and_after_its_submission(warehouses):
    # An amendment whose submission has not arrived stands as its own response under the id the
    # submission will have; when it arrives it joins that response (same response_id).
    sub_id = warehouses["late_submission"]
    q = ("select r.event_type, s.version_count, r.is_orphan, s.total is not null "
         "from core.questionnaire_scores as s join staging.stg_questionnaire_responses as r "
         "using (response_id, event_id) where response_id = ?")
    assert warehouses["full_b1"].execute(q, [sub_id]).fetchall() == [
        ("questionnaire.amended", 1, True, True)]
    assert warehouses["inc"].execute(q, [sub_id]).fetchall() == [
        ("questionnaire.amended", 2, False, True)]
    items = warehouses["full_b1"].execute(
        "select count(*) from core.questionnaire_item_answers where response_id = ?",
        [sub_id]).fetchone()[0]
    assert items == 9  # PHQ-9


def test_changed_sql_or_parameters_force_a_full_refresh(warehouses, tmp_path: Path):
    inc = warehouses["inc"]
    sql_dir = tmp_path / "sql"
    shutil.copytree(SQL_DIR, sql_dir)
    models = sqlrunner.discover_models(sql_dir)
    plan = {f: sqlrunner.plan_build(inc, m)[0] for f, m in models.items()}
    assert plan["core.sessions"].mode == "incremental"
    assert plan["marts.fct_sudden_gains"].mode == "incremental"

    path = sql_dir / "core" / "sessions.sql"
    path.write_text(path.read_text() + "\n-- a changed comment changes the code hash\n")
    changed = sqlrunner.discover_models(sql_dir)["core.sessions"]
    p, _, _ = sqlrunner.plan_build(inc, changed)
    assert (p.mode, p.reason) == ("full", "SQL or sidecar changed")
    # the run can ask for it too
    assert sqlrunner.plan_build(inc, models["core.episodes"], incremental=False)[0].mode == "full"

    inc.execute("begin transaction")
    try:
        inc.execute("update seeds.parameters set value_double = value_double + 0.5 "
                    "where name = 'sg_crit2_pct'")
        p, _, _ = sqlrunner.plan_build(inc, models["marts.fct_sudden_gains"])
        assert (p.mode, p.reason) == ("full", "seed tables or parameters changed")
        # a model that does not read the parameters stays incremental
        assert sqlrunner.plan_build(inc, models["core.sessions"])[0].mode == "incremental"
    finally:
        inc.execute("rollback")


def test_full_rebuild_upstream_forces_downstream_full(warehouses):
    inc = warehouses["inc"]
    models = sqlrunner.discover_models()
    inc.execute("begin transaction")  # leave the shared warehouse as it was
    try:
        inc.execute("create temp table _before as select * from meta.model_state")
        inc.execute("commit")
        sqlrunner.build_model(inc, models["core.sessions"], incremental=False)
        p, _, _ = sqlrunner.plan_build(inc, models["core.episodes"])
        assert (p.mode, p.reason) == ("full", "upstream core.sessions was fully rebuilt since")
        assert sqlrunner.plan_build(inc, models["core.sessions"])[0].mode == "incremental"
    finally:
        inc.execute("delete from meta.model_state")
        inc.execute("insert into meta.model_state select * from _before")


def test_as_of_builds_are_never_incremental(warehouses):
    inc = warehouses["inc"]
    models = sqlrunner.discover_models()
    sqlrunner.set_as_of(inc, "2030-01-01T00:00:00+00:00")
    try:
        p, _, _ = sqlrunner.plan_build(inc, models["core.sessions"])
        assert (p.mode, p.reason) == ("full", "as-of build")
    finally:
        sqlrunner.set_as_of(inc, None)


# ---------------------------------------------------------------- review findings (sixth session)

@pytest.fixture(scope="module")
def small_landing(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from alliance.simulation import simulate

    tmp = tmp_path_factory.mktemp("incremental-small")
    simulate(tmp / "landing", clinics=1, patients=50, months=3, seed=7, therapists_per_clinic=4,
             truth_path=tmp / "truth.json")
    return sorted((tmp / "landing").glob("*.ndjson"))


def _ingest_any(con: duckdb.DuckDBPyConnection, files: list[Path], tmp: Path) -> None:
    """Ingest without asserting on each file (a small simulation has files of one bad line)."""
    from alliance.ingest import ingest_files

    ingest_files(con, files, KEY, quarantine_dir=tmp / "quarantine")


def _differences(inc: duckdb.DuckDBPyConnection, full: duckdb.DuckDBPyConnection,
                 models: list[str] | None = None) -> list[str]:
    return [fqn for fqn in models or sqlrunner.discover_models()
            if table_rows(inc, *fqn.split(".")) != table_rows(full, *fqn.split("."))]


def test_retraction_of_an_orphan_response_reaches_incremental_builds(small_landing, tmp_path):
    """An amendment whose submission never arrived stands as a response under the missing id; a
    retraction of that id names no event that exists, and the incremental build must still find
    the episode (through the amendment) and drop the response, as a full rebuild does."""
    base = small_landing[:60]
    sub = [e for f in base for e in _events(f) if e["event_type"] == "questionnaire.submitted"
           and e["payload"].get("instrument") == "PHQ-9" and e["payload"].get("answers")][5]
    missing = _new_id()
    amend = {**{k: v for k, v in sub.items() if k != "payload"}, "event_id": _new_id(),
             "event_type": "questionnaire.amended",
             "payload": {**sub["payload"], "answers": {k: 1 for k in sub["payload"]["answers"]},
                         "amends_event_id": missing}}
    retract = {"event_id": _new_id(), "event_type": "questionnaire.retracted", "schema_version": 1,
               "occurred_at": "2025-04-01T10:00:00+00:00", "source": "simulator",
               "clinic_id": sub["clinic_id"], "patient_id": sub["patient_id"],
               "payload": {"retracts_event_id": missing, "reason": "entered_in_error"}}
    inc = duckdb.connect(str(tmp_path / "inc.duckdb"))
    _ingest_any(inc, base, tmp_path)
    _seed(inc)
    sqlrunner.run_models(inc, incremental=True)
    scored = "select count(*) from core.questionnaire_scores where response_id = ?"
    _ingest_any(inc, [_write(tmp_path / "orphan.ndjson", [amend])], tmp_path)
    sqlrunner.run_models(inc, incremental=True)
    assert inc.execute(scored, [missing]).fetchone()[0] == 1
    _ingest_any(inc, [_write(tmp_path / "retract.ndjson", [retract])], tmp_path)
    built = {r.model.fqn: r for r in sqlrunner.run_models(inc, incremental=True)}
    assert built["core.questionnaire_scores"].mode == "incremental"
    assert inc.execute(scored, [missing]).fetchone()[0] == 0
    assert _differences(inc, _full_copy(inc, tmp_path / "full.duckdb")) == []


def test_a_model_built_while_its_upstream_lags_catches_up_later(small_landing, tmp_path):
    """A mart built alone (a subset run from the UI or `--select`) while an upstream table is
    behind the log records the upstream's watermark, not the log's, so the files in between
    reach it once the upstream has them."""
    inc = duckdb.connect(str(tmp_path / "inc.duckdb"))
    _ingest_any(inc, small_landing[:50], tmp_path)
    _seed(inc)
    sqlrunner.run_models(inc, incremental=True)
    _ingest_any(inc, small_landing[50:60], tmp_path)  # the models are not rebuilt
    [alone] = sqlrunner.run_models(inc, ["marts.fct_outcome_sessions"], incremental=True)
    assert alone.mode == "incremental"
    state = "select built_through_file_id from meta.model_state where model = ?"
    assert inc.execute(state, ["marts.fct_outcome_sessions"]).fetchone()[0] \
        == inc.execute(state, ["core.questionnaire_scores"]).fetchone()[0] < 60
    _ingest_any(inc, small_landing[60:64], tmp_path)
    sqlrunner.run_models(inc, incremental=True)
    assert _differences(inc, _full_copy(inc, tmp_path / "full.duckdb"),
                        ["core.questionnaire_scores", "marts.fct_outcome_sessions",
                         "marts.fct_sudden_gains"]) == []


def test_as_of_selection_rebuilds_the_staging_tables_it_reads(small_landing, tmp_path):
    """`set_as_of` then `run_models(con, ["core", "marts"])` (the documented recipe) equals a
    warehouse that only ever had the events recorded by the cutoff: the staging models that are
    tables are rebuilt under the cutoff too."""
    from datetime import UTC, datetime, timedelta

    from alliance.ingest import ingest_files

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    work = duckdb.connect(str(tmp_path / "work.duckdb"))
    ingest_files(work, small_landing[:55], KEY, recorded_at=t0)
    ingest_files(work, small_landing[55:77], KEY, recorded_at=t0 + timedelta(days=1))
    _seed(work)
    sqlrunner.run_models(work, incremental=True)
    sqlrunner.set_as_of(work, (t0 + timedelta(hours=1)).isoformat())
    sqlrunner.run_models(work, ["core", "marts"])
    ref = duckdb.connect(str(tmp_path / "ref.duckdb"))
    ingest_files(ref, small_landing[:55], KEY, recorded_at=t0)
    _seed(ref)
    sqlrunner.run_models(ref)
    compared = [f for f in sqlrunner.discover_models() if not f.startswith("staging.")]
    assert _differences(work, ref, compared) == []


def test_prorating_beyond_the_published_allowance_fails_its_test(warehouses):
    """core.questionnaire_scores' prorating test checks the instrument's allowance in the seed
    (PHQ-9: 2 missing items), not columns derived from the same condition (it could not fail)."""
    inc = warehouses["inc"]
    model = sqlrunner.discover_models()["core.questionnaire_scores"]
    name = next(t.check_name for t in model.tests if t.column == "prorated_items")
    [clean] = sqlrunner.run_tests(inc, model, [name])
    assert clean.passed
    inc.execute("begin transaction")
    try:
        inc.execute("update core.questionnaire_scores set prorated_items = 3, prorated = true "
                    "where response_id = (select min(response_id) from core.questionnaire_scores "
                    "where instrument = 'PHQ-9' and total is not null)")
        [broken] = sqlrunner.run_tests(inc, model, [name])
        assert broken.failing == 1
    finally:
        inc.execute("rollback")
