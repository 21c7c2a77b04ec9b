"""The marts recover the simulator's ground truth (alliance-outcome r, sudden gains, ruptures).

One module-scoped warehouse: simulate a clinic network at demo size, ingest it with the
production ingest, write the seeds and build every model with the SQL runner (column tests on).
A second, tiny warehouse holds a clinic that uses version 2 of an instrument definition.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest

from alliance.config import SCHEMAS_DIR, SQL_DIR

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
    # patient-level: each patient once, with a closed episode (an open one has no end score)
    patients, episodes = con.execute("""
        select count(distinct patient_id), count(*) from marts.fct_episode_outcomes
        where instrument = 'PHQ-9' and is_closed and n_scores >= 2 and alliance_scores_n >= 3
            and early_alliance is not null and therapist_id is not null""").fetchone()
    assert n == patients and episodes > patients
    # ... the latest of them: r recomputed apart (numpy) from each patient's latest closed
    # eligible episode equals the mart's; from the earliest it would not
    rows = con.execute("""
        select patient_id, closed_at, episode_id, first_total, improvement, early_alliance
        from marts.fct_episode_outcomes
        where instrument = 'PHQ-9' and is_closed and n_scores >= 2 and alliance_scores_n >= 3
            and early_alliance is not null and therapist_id is not null""").fetchall()

    def r_of(pick: str) -> float:
        chosen: dict[str, tuple] = {}
        for row in sorted(rows, key=lambda x: (x[1], x[2]), reverse=(pick == "latest")):
            chosen.setdefault(row[0], row)
        first, improvement, alliance = (np.array([c[i] for c in chosen.values()], float)
                                        for i in (3, 4, 5))
        slope, intercept = np.polyfit(first, improvement, 1)
        return float(np.corrcoef(alliance, improvement - (intercept + slope * first))[0, 1])

    assert r == pytest.approx(r_of("latest"), abs=1e-9)
    assert abs(r_of("earliest") - r) > 1e-6
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


def test_a_pending_repair_is_not_counted_as_unrepaired(warehouse):
    """A rupture near the end of the data (episode open, fewer than the window's attended
    sessions since) was counted as unrepaired, which biased every recent repair rate low; one in
    an open episode whose patient stopped coming (no episode.closed) must not stay pending."""
    from alliance.sqlrunner import run_models

    con, truth = warehouse
    window = con.execute("select value_double from seeds.parameters "
                         "where name = 'rupture_repair_window'").fetchone()[0]
    default_days = con.execute("select value_double from seeds.parameters "
                               "where name = 'rupture_pending_max_days'").fetchone()[0]

    def check(days: float) -> dict:
        latest = dict(con.execute("select clinic_id, max(session_at) from core.sessions "
                                  "where status = 'attended' group by all").fetchall())
        rows = con.execute("""
            select f.session_month, f.session_number, f.repair_status, f.is_repaired,
                f.repair_session_number, e.is_closed, f.clinic_id,
                (select max(s.session_number) from core.sessions s
                 where s.episode_id = f.episode_id and s.status = 'attended') as last_session,
                (select max(s.session_at) from core.sessions s
                 where s.episode_id = f.episode_id and s.status = 'attended') as last_at
            from marts.fct_alliance_sessions f join core.episodes e using (episode_id)
            where f.is_candidate_rupture""").fetchall()
        per_month: dict = {}
        for month, n, status, repaired, repair_n, closed, clinic, last, last_at in rows:
            # decided apart from the mart's rule: repaired, the episode closed, the window over,
            # or the patient stopped coming (no session in `days` before the data's latest)
            known = (repair_n is not None or closed or last >= n + window
                     or (latest[clinic] - last_at).total_seconds() > days * 86400)
            expected = "repaired" if repair_n is not None else "unrepaired" if known else "pending"
            assert status == expected and repaired == ({"repaired": True, "unrepaired": False}
                                                       .get(expected)), (month, n, status, last)
            m = per_month.setdefault(month, [0, 0, 0])
            m[0] += repair_n is not None
            m[1] += known
            m[2] += not known
        return {"per_month": per_month, "statuses": {r[2] for r in rows}}

    got = check(default_days)
    assert got["statuses"] == {"repaired", "unrepaired", "pending"}, got["statuses"]
    rates = {m: (rate, pending) for m, rate, pending in con.execute(
        "select month, repair_rate, ruptures_pending from marts.clinic_monthly where scope = 'network'"
    ).fetchall()}
    for month, (rep, known, pending) in got["per_month"].items():
        rate, pend = rates[month]
        assert pend == pending
        assert (rate is None) if not known else abs(rate - rep / known) < 1e-12, (month, rate)
    # the pending ones sit at the end of the data: the simulator's ground truth agrees
    assert sum(r["repaired"] is None for r in truth["ruptures"]) > 0
    # a shorter limit: patients without a session in the data's last week have stopped coming
    pending_before = sum(v[2] for v in got["per_month"].values())
    con.execute("update seeds.parameters set value_double = 7 where name = 'rupture_pending_max_days'")
    try:
        run_models(con, ["fct_alliance_sessions"])
        short = check(7)
        assert 0 < sum(v[2] for v in short["per_month"].values()) < pending_before
    finally:
        con.execute("update seeds.parameters set value_double = ? "
                    "where name = 'rupture_pending_max_days'", [default_days])
        run_models(con, ["fct_alliance_sessions"])


def test_dropout_rate_counts_closed_episodes_without_outcome_scores(warehouse):
    con, _ = warehouse
    # the network's dropout rate over all months equals core.episodes' own count, including the
    # closed episodes that never got an outcome score (dropout_definition = end_reason)
    expected = con.execute("""
        select count(*), count(*) filter (where end_reason = 'dropout')
        from core.episodes where is_closed""").fetchone()
    got = con.execute("""
        select sum(episodes_ended), round(sum(dropout_rate * episodes_ended))
        from marts.clinic_monthly where scope = 'network'""").fetchone()
    assert (got[0], int(got[1])) == expected
    without = con.execute("""
        select count(*) from core.episodes e where is_closed and not exists (
            select 1 from marts.fct_episode_outcomes o
            where o.episode_id = e.episode_id and o.instrument = 'PHQ-9')""").fetchone()[0]
    assert without > 0  # the case this test is about occurs in the demo network
    assert con.execute("select sum(episodes_ended) - sum(episodes_closed) from marts.clinic_monthly "
                       "where scope = 'network'").fetchone()[0] == without
    assert con.execute("select sum(episodes_ended) from marts.therapist_summary").fetchone()[0] \
        == con.execute("select count(*) from core.episodes where is_closed and therapist_id is not null").fetchone()[0]


def test_single_therapist_clinic_gets_no_between_therapist_r(warehouse, tmp_path):
    """A clinic with one therapist: its between-therapist r has one point (NaN in DuckDB); the
    mart gives NULL and its blocking column tests pass instead of stopping the build."""
    import shutil

    from alliance.sqlrunner import run_models

    con, _ = warehouse
    con.execute("checkpoint")
    src = con.execute("select path from duckdb_databases() where database_name = current_database()").fetchone()[0]
    shutil.copy(src, tmp_path / "copy.duckdb")
    other = duckdb.connect(str(tmp_path / "copy.duckdb"))
    try:
        clinic, therapist = other.execute("""
            select clinic_id, any_value(therapist_id) from marts.fct_episode_outcomes
            where therapist_id is not null group by clinic_id order by clinic_id limit 1""").fetchone()
        other.execute("delete from marts.fct_episode_outcomes where clinic_id = ? and therapist_id <> ?",
                      [clinic, therapist])
        run_models(other, ["marts.alliance_outcome_association"], tests=True)
        rows = dict(other.execute("""select part, r from marts.alliance_outcome_association
                                     where scope = 'clinic' and clinic_id = ?""", [clinic]).fetchall())
        assert rows["between_therapist"] is None
        assert other.execute("select count(*) from marts.alliance_outcome_association "
                             "where isnan(r)").fetchone()[0] == 0
    finally:
        other.close()


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
    # every attended session with a therapist is in exactly one therapist's row
    sessions = con.execute("select count(*) from core.sessions where status = 'attended' "
                           "and therapist_id is not null").fetchone()[0]
    assert sessions > 100
    assert con.execute("select sum(sessions_attended) from marts.therapist_summary").fetchone()[0] \
        == sessions
    # rates are fractions
    lo, hi = con.execute("""select min(least(rupture_rate, reliable_improvement_rate, dropout_rate)),
        max(greatest(rupture_rate, reliable_improvement_rate, dropout_rate))
        from marts.clinic_monthly""").fetchone()
    assert 0 <= lo and hi <= 1
    # Severity-adjusted change, recomputed apart: the least-squares line of improvement on intake
    # score over the network's closed, paired PHQ-9 episodes (numpy), and the intake SD.
    fit = con.execute("""select first_total, improvement from marts.fct_episode_outcomes
        where instrument = 'PHQ-9' and is_paired and is_closed""").fetchnumpy()
    assert len(fit["first_total"]) > 30
    slope, intercept = np.polyfit(fit["first_total"], fit["improvement"], 1)
    sd = float(np.std(fit["first_total"], ddof=1))
    rows = con.execute("""select first_total, improvement, is_paired, expected_improvement,
        improvement_vs_expected, network_intake_sd from marts.fct_episode_outcomes
        where instrument = 'PHQ-9' and first_total is not null""").fetchall()
    assert len(rows) > len(fit["first_total"])  # open and unpaired episodes get it too
    for first, improvement, paired, expected, vs_expected, network_sd in rows:
        assert expected == pytest.approx(intercept + slope * first, rel=1e-9, abs=1e-9)
        assert network_sd == pytest.approx(sd, rel=1e-9)
        if paired:
            assert vs_expected == pytest.approx(improvement - expected, abs=1e-9)
        else:
            assert vs_expected is None
    # ... and the clinic-month effect size is the mean of improvement_vs_expected over that SD
    # (the episodes closed in the clinic and month, clinic_monthly's outcome rows)
    months = con.execute("""select clinic_id, month, severity_adjusted_effect_size
            from marts.clinic_monthly where scope = 'clinic' and severity_adjusted_effect_size
            is not null order by clinic_id, month limit 3""").fetchall()
    assert len(months) == 3
    for clinic, month, es in months:
        mean = con.execute("""select avg(improvement_vs_expected) from marts.fct_episode_outcomes
            where instrument = 'PHQ-9' and is_closed and clinic_id = ? and outcome_month = ?""",
            [clinic, month]).fetchone()[0]
        assert es == pytest.approx(mean / sd, rel=1e-9)


def test_reliable_change_of_exactly_the_instrument_value_counts(warehouse):
    """jt_sd_source = instrument (the default): a change of at least the instrument's reliable
    change value is reliable, as its definition says and fct_outcome_sessions counts it; a change
    of exactly that value must not fall to floating-point rounding of change / (rc / z) vs z."""
    con, _ = warehouse
    at_edge, edge_missed, inconsistent = con.execute("""
        select count(*) filter (where abs(e.improvement) = i.reliable_change),
            count(*) filter (where e.improvement = i.reliable_change and not e.reliably_improved
                or e.improvement = -i.reliable_change and not e.reliably_deteriorated),
            count(*) filter (where e.reliably_improved is distinct from (e.improvement >= i.reliable_change)
                or e.reliably_deteriorated is distinct from (e.improvement <= -i.reliable_change)
                or (e.jt_category in ('improved', 'recovered')) is distinct from e.reliably_improved)
        from marts.fct_episode_outcomes e
        join seeds.instruments i using (instrument, instrument_version)
        where e.is_paired and i.reliable_change is not null""").fetchone()
    assert at_edge > 0  # the demo network has changes of exactly 6 (PHQ-9) and 4 (GAD-7)
    assert edge_missed == 0
    assert inconsistent == 0


def test_demo_size_runtime(warehouse):
    _, truth = warehouse
    # simulate + ingest + build at demo size; the budget for this file is about a minute
    assert truth["_seconds"] < 90, truth["_seconds"]


# ---------------------------------------------------------------- instrument versions


V2_DEFINITION_CHANGES = {  # BDI-II version "2": a clinic's own reliable change and cutoff
    'version: "1"': 'version: "2"',
    "threshold: 14": "threshold: 20",
    "values: {any: 14}": "values: {any: 20}",
}


@pytest.fixture(scope="module")
def versioned(tmp_path_factory: pytest.TempPathFactory) -> duckdb.DuckDBPyConnection:
    """Two clinics, the same BDI-II series; clinic-v2 scores under a version 2 definition whose
    reliable change is 4 (version 1: 8.46) and clinical cutoff 20 (version 1: 14)."""
    import re

    from alliance.importers.wide_csv import import_wide_csv_to_landing
    from alliance.ingest import ingest_files
    from alliance.instruments import load_instruments, write_parameters_table, write_seed_tables
    from alliance.sqlrunner import run_models

    tmp = tmp_path_factory.mktemp("versions")
    text = (SCHEMAS_DIR / "instruments" / "bdi-ii.yaml").read_text()
    for old, new in V2_DEFINITION_CHANGES.items():
        assert old in text, old
        text = text.replace(old, new)
    text = re.sub(r"reliable_change:\n(  .*\n)+", "reliable_change:\n  value: 4\n  source: seggar2002\n",
                  text)
    (tmp / "instruments").mkdir()
    (tmp / "instruments" / "bdi-ii-v2.yaml").write_text(text)
    instruments = load_instruments([SCHEMAS_DIR / "instruments", tmp / "instruments"])
    assert instruments[("BDI-II", "2")].reliable_change == 4

    # patient 1 drops 6 points after session 3 (a gain under version 2's cutoff 4, not under
    # 8.46); patient 2 stays flat
    (tmp / "series.csv").write_text("id,s1,s2,s3,s4,s5,s6\n1,20,20,20,14,14,14\n2,22,21,22,21,22,21\n")
    files = []
    for clinic, version in (("clinic-v1", "1"), ("clinic-v2", "2")):
        mapping = {"kind": "wide_csv", "format": "wide", "clinic_id": clinic, "id_column": "id",
                   "sessions": True, "first_session": 1, "default_timing": "pre_session",
                   "scores": [{"instrument": "BDI-II", "version": version,
                               "column_pattern": r"^s(\d+)$"}]}
        # (as a clinic would: the importer checks the version against the same definitions)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ALLIANCE_INSTRUMENTS_DIR", str(tmp / "instruments"))
            files.append(import_wide_csv_to_landing(
                tmp / "series.csv", mapping, tmp / "landing",
                key=b"marts-tests-key-0123456789abcdef0123").events_path)
    con = duckdb.connect(str(tmp / "warehouse.duckdb"))
    for res in ingest_files(con, files, KEY, instruments=instruments, quarantine_dir=tmp / "q"):
        assert res.quarantined == 0
    write_seed_tables(con, instruments)
    write_parameters_table(con, SQL_DIR / "parameters.yml")
    con.execute("update seeds.parameters set value_text = 'BDI-II' where name = 'sg_instrument'")
    run_models(con, tests=True)
    return con


def test_instrument_version_brings_its_own_reliable_change_and_cutoff(versioned):
    con = versioned
    z = con.execute("select value_double from seeds.parameters where name = 'jt_z'").fetchone()[0]
    rows = con.execute("""
        select clinic_id, jt_s_diff, jt_cutoff, jt_category from marts.fct_episode_outcomes
        where instrument = 'BDI-II' and first_total = 20 order by clinic_id""").fetchall()
    assert [(c, round(s * z, 6), cut, cat) for c, s, cut, cat in rows] == [
        ("clinic-v1", 8.46, 14, "unchanged"),   # 6 points < 8.46: not reliable
        ("clinic-v2", 4.0, 20, "recovered"),    # 6 >= 4 and from >= 20 to below 20
    ]
    gains = con.execute("""select clinic_id, pre_position, magnitude, crit1_cutoff
                           from marts.fct_sudden_gains""").fetchall()
    assert gains == [("clinic-v2", 3, 6.0, 4.0)]
    # the version is carried where it decides the values
    assert con.execute("""select distinct clinic_id, instrument_version from marts.fct_sudden_gains
        union all select distinct clinic_id, instrument_version from marts.fct_episode_outcomes
        where instrument = 'BDI-II' order by all""").fetchall() == [
        ("clinic-v1", "1"), ("clinic-v2", "2"), ("clinic-v2", "2")]


# ---------------------------------------------------------------- as-of filter and small cells


def test_as_of_filter_lives_only_in_stg_events(versioned):
    from alliance.sqlrunner import discover_models

    # every model reaches the event log through staging.stg_events, the one as-of filter
    readers = {fqn for fqn, m in discover_models().items() if ("raw", "events") in m.deps}
    assert readers == {"staging.stg_events"}
    assert [p.name for p in SQL_DIR.rglob("*.sql") if "getvariable('as_of')" in p.read_text()] == [
        "stg_events.sql"]
    # and it reaches every staging model (views and tables, rebuilt as asof_job does): as of
    # before the first event, staging is empty
    from alliance.sqlrunner import run_models

    con = versioned
    staging = sorted(fqn for fqn in discover_models() if fqn.startswith("staging."))
    assert {"staging.stg_questionnaire_versions", "staging.stg_questionnaire_retractions"} <= set(
        staging)
    con.execute("set variable as_of = '2000-01-01T00:00:00Z'")
    try:
        run_models(con, staging)
        counts = {t: con.execute(f"select count(*) from {t}").fetchone()[0] for t in staging}
    finally:
        con.execute("reset variable as_of")
        run_models(con, staging)
    assert set(counts.values()) == {0}, counts
    assert con.execute("select count(*) from staging.stg_questionnaire_versions").fetchone()[0] > 0


def test_small_cell_threshold_is_the_reports(warehouse):
    from alliance.report.suppress import DEFAULT_MIN_CELL

    con, _ = warehouse
    value, source = con.execute("""select value_double, source from seeds.parameters
                                   where name = 'min_cell_size'""").fetchone()
    assert value == DEFAULT_MIN_CELL == 11
    assert "(20" in source  # author or organisation and year
    assert con.execute("""select count(*) from marts.therapist_summary
                          where is_small_cell <> (patients < 11)""").fetchone()[0] == 0
    assert con.execute("""select count(*) from marts.clinic_monthly
        where is_small_cell_patients <> (patients < 11)""").fetchone()[0] == 0
    # The outcome flag covers every outcome rate's own denominator (recomputed here from the
    # episodes): 11+ closed episodes can still give a recovery rate over 1-10 of them.
    bases = """count(*) filter (where is_paired) as paired,
            count(*) filter (where is_paired and clinical_before) as clinical"""
    small = "closed < 11 or (paired between 1 and 10) or (clinical between 1 and 10)"
    rows = con.execute(f"""
        with b as (select clinic_id, outcome_month as month, count(*) as closed, {bases},
                          count(*) filter (where nhstt_case_at_start) as cases,
                          count(*) filter (where nhstt_eligible) as eligible
                   from marts.fct_episode_outcomes where instrument = 'PHQ-9' and is_closed
                   group by all)
        select m.is_small_cell_outcomes, coalesce({small} or (cases between 1 and 10)
                   or (eligible between 1 and 10), true), m.episodes_closed
        from marts.clinic_monthly m left join b using (clinic_id, month)
        where m.scope = 'clinic'""").fetchall()
    assert rows and all(flag == expected for flag, expected, _ in rows)
    assert any(flag and closed >= 11 for flag, _, closed in rows)  # the case the base decides
    rows = con.execute(f"""
        with b as (select therapist_id, clinic_id, count(*) as closed, {bases},
                          count(early_alliance) as early
                   from marts.fct_episode_outcomes where instrument = 'PHQ-9' and is_closed
                       and therapist_id is not null group by all)
        select t.is_small_cell_outcomes, coalesce({small} or (early between 1 and 10), true),
            t.episodes_closed
        from marts.therapist_summary t left join b using (therapist_id, clinic_id)""").fetchall()
    assert rows and all(flag == expected for flag, expected, _ in rows)


def test_a_clinic_whose_data_lags_keeps_its_pending_ruptures(warehouse, tmp_path):
    """The pending rule's "now" is each clinic's latest attended session: with one network-wide
    "now", a clinic whose export lags saw its patients as stopped, and its ruptures as unrepaired."""
    import shutil

    from alliance.sqlrunner import run_models

    con, _ = warehouse
    con.execute("checkpoint")
    copy = tmp_path / "lagging.duckdb"
    shutil.copy(con.execute("select path from duckdb_databases() where database_name = "
                            "current_database()").fetchone()[0], copy)
    with duckdb.connect(str(copy)) as lag:
        clinic, pending = lag.execute(
            "select clinic_id, count(*) filter (where repair_status = 'pending') as n "
            "from marts.fct_alliance_sessions group by all order by n desc, clinic_id limit 1").fetchone()
        assert pending > 0
        # the clinic's data, unchanged but 60 days older: its export lags the others'
        lag.execute("update core.sessions set session_at = session_at - interval 60 day "
                    "where clinic_id = ?", [clinic])
        run_models(lag, ["fct_alliance_sessions"])
        after = lag.execute("select count(*) from marts.fct_alliance_sessions "
                            "where clinic_id = ? and repair_status = 'pending'", [clinic]).fetchone()[0]
    assert after == pending
