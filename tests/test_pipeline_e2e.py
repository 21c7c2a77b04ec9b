"""End to end: simulator -> one real Dagster run of every asset -> warehouse, snapshot, checks.

Also checks the simulator's ground truth against the ingest (every bad record where it was put,
per-file conservation) and that no raw identifier reaches any text column of either DuckDB file.
"""

from __future__ import annotations

import json
import os
import re

import duckdb
import pytest

from alliance.config import paths

RAW_ID = re.compile(r"(PAT|THR|EPI|SES)-")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    old = {k: os.environ.get(k) for k in ("ALLIANCE_DATA_DIR", "ALLIANCE_DEMO", "DAGSTER_HOME")}
    os.environ["ALLIANCE_DATA_DIR"] = str(root)
    os.environ["ALLIANCE_DEMO"] = "1"
    try:
        from alliance.simulator import simulate
        from orchestration.execution import run_all

        p = paths().ensure()
        truth_path = root / "simulation" / "ground_truth.json"
        simulate(p.landing, clinics=2, patients=160, seed=7, bad_share=0.03, truth_path=truth_path)
        outcome = run_all(log=lambda m: None)
        yield p, json.loads(truth_path.read_text()), outcome
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_run_succeeds_and_publishes(pipeline):
    p, _truth, outcome = pipeline
    assert outcome["success"], outcome
    assert p.serving.exists()
    with duckdb.connect(str(p.serving), read_only=True) as con:
        tables = {f"{s}.{t}" for s, t in con.execute(
            "select schema_name, table_name from duckdb_tables()").fetchall()}
        for t in ("raw.events", "core.sessions", "core.questionnaire_scores",
                  "marts.fct_episode_outcomes", "marts.clinic_monthly"):
            assert t in tables
            assert con.execute(f"select count(*) from {t}").fetchone()[0] > 0, t


def test_every_table_and_column_of_the_snapshot_is_documented(pipeline):
    """Analysts read the serving snapshot: every table and every column carries a comment."""
    p, _truth, _outcome = pipeline
    with duckdb.connect(str(p.serving), read_only=True) as con:
        tables = con.execute("""select schema_name || '.' || table_name from duckdb_tables()
                                where comment is null or trim(comment) = ''""").fetchall()
        columns = con.execute("""select schema_name || '.' || table_name || '.' || column_name
                                 from duckdb_columns() c
                                 where (comment is null or trim(comment) = '')
                                   and exists (select 1 from duckdb_tables() t
                                               where t.schema_name = c.schema_name
                                                 and t.table_name = c.table_name)""").fetchall()
    assert tables == [] and columns == []


def test_data_docs_show_the_batch_and_the_marts_suites(pipeline):
    """GX Data Docs under <data>/quality-docs list every suite the run validated: the batch
    suites on raw.events and the marts suites run inside the models step."""
    p, _truth, _outcome = pipeline
    site = p.quality_docs / "site"
    index = (site / "index.html").read_text(errors="replace")
    for suite in ("raw_events_batch", "marts_fct_episode_outcomes", "marts_clinic_monthly",
                  "core_questionnaire_scores"):
        assert f"validations/{suite}/" in index, suite
    pages = "".join(f.read_text(errors="replace") for f in site.rglob("*.html"))
    assert not RAW_ID.search(pages)


def test_every_injected_bad_record_is_where_the_simulator_put_it(pipeline):
    p, truth, _ = pipeline
    with duckdb.connect(str(p.warehouse), read_only=True) as con:
        quarantined = {(f, ln): r for f, ln, r in con.execute(
            "select source_file, line_number, reason_code from raw.quarantine").fetchall()}
        files = {r[0]: r[1:] for r in con.execute(
            "select file_name, lines_read, accepted, duplicates, quarantined, dropped_fields "
            "from raw.ingested_files").fetchall()}
    kinds = set()
    for bad in truth["bad_records"]:
        kinds.add(bad["kind"])
        if bad["expected_reason"] == "duplicate":
            assert (bad["file"], bad["line"]) not in quarantined
        else:
            assert quarantined.get((bad["file"], bad["line"])) == bad["expected_reason"], bad
    assert len(kinds) == 7, kinds
    # the conservation identity per file, and the simulator's expectation of it
    for name, exp in truth["files"].items():
        lines, accepted, dups, quar, dropped = files[name]
        assert lines == accepted + dups + quar
        assert (lines, accepted, dups, quar, dropped) == (
            exp["lines"], exp["expected_accepted"], exp["duplicates"], exp["quarantined"],
            exp["dropped_fields"]), name


@pytest.mark.parametrize("which", ["warehouse", "serving"])
def test_no_raw_identifier_or_free_text_in_any_text_column(pipeline, which):
    p, _truth, _ = pipeline
    db = p.warehouse if which == "warehouse" else p.serving
    with duckdb.connect(str(db), read_only=True) as con:
        cols = con.execute(
            "select schema_name, table_name, column_name from duckdb_columns() "
            "where data_type in ('VARCHAR', 'JSON') or data_type like '%VARCHAR%'"
        ).fetchall()
        assert len(cols) > 50
        for s, t, c in cols:
            hits = con.execute(
                f'select count(*) from "{s}"."{t}" where regexp_matches("{c}"::varchar, '
                f"'{RAW_ID.pattern}') or \"{c}\"::varchar ilike '%synthetic note%'").fetchone()[0]
            assert hits == 0, f"raw identifier or free text in {s}.{t}.{c}"


def test_rerun_adds_nothing(pipeline):
    p, _truth, _ = pipeline
    from orchestration.execution import execute_job

    def counts():
        with duckdb.connect(str(p.warehouse), read_only=True) as con:
            return con.execute("select (select count(*) from raw.events), "
                               "(select count(*) from raw.quarantine), "
                               "(select count(*) from raw.ingested_files)").fetchone()

    before = counts()
    # a second real Dagster run of the ingest over the same landing folder
    out = execute_job("ingest_job", select="group:ingest", log=lambda m: None)
    assert out["success"]
    assert counts() == before
    # ... which did read the folder: every landing file was seen and found already ingested
    import dagster as dg

    from alliance.ingest import landing_files
    from orchestration.instance import get_instance

    records = get_instance().get_records_for_run(
        out["run_id"], of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    [meta] = [r.event_log_entry.asset_materialization.metadata for r in records
              if r.event_log_entry.asset_materialization.asset_key == dg.AssetKey(["raw", "events"])]
    n_files = len(landing_files(p.landing))
    assert n_files > 10 and before[2] == n_files
    assert meta["files_seen"].value == meta["files_already_ingested"].value == n_files
    assert meta["files_ingested"].value == meta["lines_read"].value == 0
