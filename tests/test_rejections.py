"""Rejecting an ingested file (alliance reject-file): its events leave staging and every model,
the next build is a full one equal to a rebuild from scratch, an as-of rebuild before the
rejection still sees them, and a corrected re-send of the same event ids is accepted."""

from __future__ import annotations

import json
import shutil
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest
from table_rows import table_rows

from alliance.ingest import ingest_files, landing_files
from alliance.instruments import load_instruments, write_parameters_table, write_seed_tables
from alliance.rejections import RejectionError, reject_files
from alliance.simulation import simulate
from alliance.sqlrunner import discover_models, run_models

KEY = b"rejections-test-key-0123456789abcdef0123"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    tmp = tmp_path_factory.mktemp("rejections")
    simulate(tmp / "landing", clinics=1, patients=40, months=3, therapists_per_clinic=3,
             bad_share=0.0, truth_path=tmp / "truth.json")
    files = landing_files(tmp / "landing")
    db = tmp / "w.duckdb"
    con = duckdb.connect(str(db))
    ingest_files(con, files, KEY)
    write_seed_tables(con, load_instruments())
    from alliance.config import SQL_DIR

    write_parameters_table(con, SQL_DIR / "parameters.yml")
    run_models(con)
    con.close()
    return db, files


def _tables(con: duckdb.DuckDBPyConnection) -> list[str]:
    return [m.fqn for m in discover_models().values() if m.materialized == "table"]


def test_rejected_file_leaves_every_model_and_the_next_build_is_full(built, tmp_path):
    db, _files = built
    work = tmp_path / "w.duckdb"
    shutil.copy(db, work)
    con = duckdb.connect(str(work))
    # the file with the most events, so that models visibly change
    fid, n = con.execute("select file_id, count(*) from raw.events group by 1 order by 2 desc, 1 "
                         "limit 1").fetchone()
    before = con.execute("select count(*) from staging.stg_events").fetchone()[0]
    [r] = reject_files(con, [fid], "corrupt_export")
    assert (r.file_id, r.events) == (fid, n)
    assert reject_files(con, [fid], "corrupt_export") == []  # already rejected: a no-op
    built_results = run_models(con, incremental=True)
    assert all(b.mode == "full" for b in built_results if b.model.materialized == "table")
    assert con.execute("select count(*) from staging.stg_events").fetchone()[0] == before - n
    assert con.execute("select count(*) from staging.stg_events where file_id = ?",
                       [fid]).fetchone()[0] == 0
    # the blocking events_conserved check accounts for the rejected file's events too (it
    # counted them as lost, so `reject-file` then `alliance run` could never publish)
    from quality.relational import conservation_report

    assert [r for r in conservation_report(con) if r["unaccounted"]] == []
    # as of a time before the rejection (after the events were recorded: the two can be less
    # than a second apart), the file's events are still known; after it, not
    last_recorded = con.execute("select max(recorded_at) from raw.events").fetchone()[0]
    between = last_recorded + (r.rejected_at - last_recorded) / 2
    assert last_recorded < between < r.rejected_at
    con.execute(f"set variable as_of = '{between.isoformat()}'::timestamptz")
    assert con.execute("select count(*) from staging.stg_events").fetchone()[0] == before
    con.execute("reset variable as_of")
    from alliance.asof import build_as_of

    for label, at, expected in (("before", between, before),
                                ("after", r.rejected_at + timedelta(seconds=1), before - n)):
        build_as_of(con, tmp_path / f"asof-{label}.duckdb", at)
        with duckdb.connect(str(tmp_path / f"asof-{label}.duckdb"), read_only=True) as a:
            assert a.execute("select count(*) from staging.stg_events").fetchone()[0] == expected
    # the incremental run after the rejection equals a full rebuild
    con.close()
    full = tmp_path / "full.duckdb"
    shutil.copy(work, full)
    fcon = duckdb.connect(str(full))
    run_models(fcon, incremental=False)
    fcon.close()
    con = duckdb.connect(str(work))
    con.execute(f"attach '{full}' as f (read_only)")
    for t in _tables(con):
        schema, name = t.split(".")
        assert table_rows(con, schema, name) == table_rows(con, schema, name, catalog="f"), t
    con.close()


def test_corrected_resend_after_rejection_is_accepted(tmp_path):
    ev = {"event_id": "ev-1", "event_type": "episode.opened", "schema_version": 1,
          "occurred_at": "2025-03-03T09:00:00+01:00", "source": "t", "clinic_id": "c1",
          "patient_id": "P1", "episode_id": "E1", "payload": {"age_group": "adult"}}
    first = tmp_path / "a.ndjson"
    first.write_text(json.dumps(ev) + "\n")
    fixed = tmp_path / "b.ndjson"
    fixed.write_text(json.dumps({**ev, "payload": {"age_group": "child"}}) + "\n")
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    ingest_files(con, [first], KEY, instruments=None)
    with pytest.raises(RejectionError, match="no ingested file"):
        reject_files(con, ["nope.ndjson"], "superseded")
    with pytest.raises(RejectionError, match="unknown reason code"):
        reject_files(con, ["a.ndjson"], "because I said so")
    assert con.execute("select count(*) from raw.rejected_files").fetchone()[0] == 0
    # before the rejection the corrected line conflicts with the logged one ...
    probe = duckdb.connect(str(tmp_path / "probe.duckdb"))
    ingest_files(probe, [first], KEY, instruments=None)
    [p] = ingest_files(probe, [fixed], KEY, instruments=None)
    assert p.quarantine_reasons == {"conflicting_duplicate": 1}
    # ... after it, the re-send is accepted; the log keeps both versions, staging the new one
    reject_files(con, ["a.ndjson"], "superseded")
    [res] = ingest_files(con, [fixed], KEY, instruments=None)
    assert (res.accepted, res.quarantined) == (1, 0)
    assert con.execute("select count(*) from raw.events").fetchone()[0] == 2


def test_cli_rejects_by_name_and_explains_errors(built, tmp_path, monkeypatch, capsys):
    from orchestration import cli

    db, files = built
    data = tmp_path / "data"
    (data / "warehouse").mkdir(parents=True)
    shutil.copy(db, data / "warehouse" / "alliance.duckdb")
    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(data))
    assert cli.main(["reject-file", files[0].name, "--reason", "test_data"]) == 0
    assert "rejected file_id 1" in capsys.readouterr().out
    # the UI sees it on the external asset raw/rejected_files
    import dagster as dg

    from orchestration.instance import get_instance

    event = get_instance().get_latest_materialization_event(dg.AssetKey(["raw", "rejected_files"]))
    assert event is not None and event.asset_materialization.metadata["reason_code"].value == "test_data"
    assert cli.main(["reject-file", "missing.ndjson", "--reason", "test_data"]) == 2
    assert "no ingested file" in capsys.readouterr().err


def test_a_name_shared_by_two_files_is_refused_not_rejected_twice(tmp_path):
    """Two ingested files with one name (two folders of landing/, or a corrected re-send):
    rejecting by that name would reject a file nobody looked at, so it asks for the file_id."""
    ev = {"event_id": "ev-1", "event_type": "episode.opened", "schema_version": 1,
          "occurred_at": "2025-03-03T09:00:00+01:00", "source": "t", "clinic_id": "c1",
          "patient_id": "P1", "episode_id": "E1", "payload": {"age_group": "adult"}}
    for site, eid in (("siteA", "ev-a"), ("siteB", "ev-b")):
        (tmp_path / site).mkdir()
        (tmp_path / site / "export.ndjson").write_text(json.dumps({**ev, "event_id": eid}) + "\n")
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    ingest_files(con, [tmp_path / "siteA" / "export.ndjson", tmp_path / "siteB" / "export.ndjson"],
                 KEY, instruments=None)
    with pytest.raises(RejectionError, match=r"2 ingested files have this name \(file_ids 1, 2\)"):
        reject_files(con, ["export.ndjson"], "corrupt_export")
    assert con.execute("select count(*) from raw.rejected_files").fetchone()[0] == 0
    [r] = reject_files(con, ["2"], "corrupt_export")
    assert r.file_id == 2
