"""The marts recover the simulator's ground truth (alliance-outcome r, sudden gains, ruptures).

One module-scoped warehouse: simulate a clinic network at demo size, ingest it with the
production ingest, write the seeds and build every model with the SQL runner (column tests on).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb
import pytest

from alliance.config import SQL_DIR

KEY = b"marts-test-key-0123456789abcdef0123456789"
# The demo size (SimParams defaults: 3 clinics, 1500 patients, 18 months).
PATIENTS = 1500
CONFIGURED_R = 0.28


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> tuple[duckdb.DuckDBPyConnection, dict]:
    from alliance.ingest import ingest_files, landing_files
    from alliance.instruments import load_instruments, write_parameters_table, write_seed_tables
    from alliance.simulation import simulate
    from alliance.sqlrunner import run_models

    tmp = tmp_path_factory.mktemp("marts")
    t0 = time.perf_counter()
    summary = simulate(tmp / "landing", patients=PATIENTS, alliance_outcome_r=CONFIGURED_R,
                       truth_path=tmp / "truth.json")
    con = duckdb.connect(str(tmp / "warehouse.duckdb"))
    ingest_files(con, landing_files(tmp / "landing"), KEY, quarantine_dir=tmp / "quarantine")
    write_seed_tables(con, load_instruments())
    write_parameters_table(con, SQL_DIR / "parameters.yml")
    run_models(con, tests=True)  # error-severity column tests raise
    truth = json.loads(Path(summary["truth_path"]).read_text())
    truth["_seconds"] = time.perf_counter() - t0
    return con, truth


def test_alliance_outcome_r_recovers_configured_value(warehouse):
    con, truth = warehouse
    r, n, lo, hi = con.execute("""
        select r, n, ci_low, ci_high from marts.alliance_outcome_association
        where scope = 'network' and part = 'overall'""").fetchone()
    assert n > 300
    assert lo < r < hi
    assert abs(r - truth["parameters"]["alliance_outcome_r"]) <= 0.05, (r, n)
    parts = dict(con.execute("""select part, r from marts.alliance_outcome_association
                                where scope = 'network'""").fetchall())
    assert set(parts) == {"overall", "within_therapist", "between_therapist"}


def _recall_and_false_positives(found: set[str], injected: set[str]) -> tuple[float, float]:
    recall = len(found & injected) / len(injected)
    false_pos = len(found - injected) / max(1, len(found))
    return recall, false_pos


def test_sudden_gains_found(warehouse):
    con, truth = warehouse
    injected = {g["postgain_event_id"] for g in truth["sudden_gains"]}
    assert len(injected) >= 30
    found = {r[0] for r in con.execute("""select post_response_id from marts.fct_sudden_gains
                                          where sg_type = 'gain' and instrument = 'PHQ-9'""").fetchall()}
    recall, false_pos = _recall_and_false_positives(found, injected)
    assert recall >= 0.90, (recall, len(injected))
    assert false_pos <= 0.10, (false_pos, len(found))


def test_ruptures_found_and_repairs_match(warehouse):
    con, truth = warehouse
    injected = {r["srs_event_id"]: r for r in truth["ruptures"]}
    assert len(injected) >= 30
    rows = con.execute("""select alliance_response_id, is_repaired from marts.fct_alliance_sessions
                          where is_candidate_rupture""").fetchall()
    found = {rid for rid, _ in rows}
    recall, false_pos = _recall_and_false_positives(found, set(injected))
    assert recall >= 0.90, (recall, len(injected))
    assert false_pos <= 0.10, (false_pos, len(found))
    both = [(rep, injected[rid]["repaired"]) for rid, rep in rows if rid in injected]
    agree = sum(a == b for a, b in both) / len(both)
    assert agree >= 0.90, agree


def test_aggregates_are_consistent(warehouse):
    con, _ = warehouse
    # the network row of a month adds up its clinic rows
    bad = con.execute("""
        select n.month from marts.clinic_monthly n
        join (select month, sum(sessions_attended) s, sum(episodes_closed) e
              from marts.clinic_monthly where scope = 'clinic' group by month) c using (month)
        where n.scope = 'network' and (n.sessions_attended <> c.s or n.episodes_closed <> c.e)
    """).fetchall()
    assert bad == []
    sessions = con.execute("select count(*) from core.sessions where status = 'attended'").fetchone()[0]
    assert con.execute("select sum(sessions_attended) from marts.therapist_summary").fetchone()[0] \
        <= sessions
    # rates are fractions; the severity-adjusted effect size averages ~0 over the network
    lo, hi = con.execute("""select min(least(rupture_rate, reliable_improvement_rate, dropout_rate)),
        max(greatest(rupture_rate, reliable_improvement_rate, dropout_rate))
        from marts.clinic_monthly""").fetchone()
    assert 0 <= lo and hi <= 1
    es = con.execute("""select sum(improvement_vs_expected) / count(*) from marts.fct_episode_outcomes
        where instrument = 'PHQ-9' and is_paired and is_closed""").fetchone()[0]
    assert abs(es) < 1e-6


def test_demo_size_runtime(warehouse):
    _, truth = warehouse
    # simulate + ingest + build at demo size; the budget for this file is about a minute
    assert truth["_seconds"] < 90, truth["_seconds"]
