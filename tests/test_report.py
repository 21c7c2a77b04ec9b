"""Clinic reports: suppression rules, rendering from a snapshot, real headless Chromium, Dagster asset."""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from conftest import require_present

from alliance.config import REPO_ROOT
from alliance.report import Options, build_report, report_path
from alliance.report.data import RawReport
from alliance.report.suppress import (
    PRIMARY,
    SECONDARY,
    Shown,
    suppress_categories,
    suppress_groups,
    suppress_rate,
    suppress_rows,
)

CHROMIUM = Path("/usr/bin/chromium")
MONTH = "2025-12"


# ---------------------------------------------------------------- suppression (pure)

def test_rows_secondary_when_exactly_one_small() -> None:
    reasons, hide_total = suppress_rows([30, 25, 5, 14], 11)
    assert reasons == [None, None, PRIMARY, SECONDARY]  # 14 is the next smallest
    assert hide_total == [False]


def test_rows_two_small_need_no_secondary() -> None:
    reasons, _ = suppress_rows([30, 4, 5, 14], 11)
    assert reasons == [None, PRIMARY, PRIMARY, None]


def test_single_row_hides_total() -> None:
    reasons, hide_total = suppress_rows([5], 11)
    assert reasons == [PRIMARY] and hide_total == [True]


def test_categories_cannot_be_recovered_from_total() -> None:
    counts, total, pct = suppress_categories(
        {"recovered": 20, "improved": 15, "unchanged": 30, "deteriorated": 3, "harmed": 0}, 11)
    assert counts["deteriorated"].suppressed == PRIMARY
    # zero is shown (rests on nobody); the next smallest non-zero goes too
    assert counts["harmed"].suppressed is None and counts["harmed"].value == 0
    assert counts["improved"].suppressed == SECONDARY
    assert pct["improved"].shown is None and pct["deteriorated"].shown is None
    shown_sum = sum(c.shown for c in counts.values() if c.shown is not None)
    hidden = [k for k, c in counts.items() if c.is_suppressed]
    assert total.shown == 68 and len(hidden) == 2 and total.shown - shown_sum == 18


def test_small_total_hides_all() -> None:
    counts, total, pct = suppress_categories({"a": 4, "b": 3}, 11)
    assert total.is_suppressed and all(c.is_suppressed for c in counts.values())


def test_nested_groups_reach_fixed_point() -> None:
    # bins 0-2 below cutoff (sum published as concern), 3-4 above; bin 3 small
    reasons, hide = suppress_groups([20, 30, 40, 5, 50], [[0, 1, 2, 3, 4], [0, 1, 2], [3, 4]], 11)
    # 3 primary -> group [3,4] needs 4; whole group then has two; below group untouched
    assert reasons == [None, None, None, PRIMARY, SECONDARY] and hide == [False, False, False]
    reasons, hide = suppress_groups([5, 30, 40, 20, 50], [[0, 1, 2, 3, 4], [0, 1, 2], [3, 4]], 11)
    assert reasons[0] == PRIMARY and reasons[1] == SECONDARY and sum(r is not None for r in reasons) == 2


def test_rate_suppression() -> None:
    assert suppress_rate(3, 10, 11).is_suppressed
    assert not suppress_rate(3, 50, 11).is_suppressed
    assert suppress_rate(3, 50, 11, protect_numerators=True).is_suppressed
    assert suppress_rate(0, 0, 11).shown is None and not suppress_rate(0, 0, 11).is_suppressed


# ---------------------------------------------------------------- fixture snapshot

THERAPISTS = {"th_aaaaaaaaaaaaaaa1": 30, "th_aaaaaaaaaaaaaaa2": 25,
              "th_aaaaaaaaaaaaaaa3": 5, "th_aaaaaaaaaaaaaaa4": 14}


def make_snapshot(path: Path) -> Path:
    """A small snapshot with the documented core/mart columns (clinic C1, one tiny clinic C2)."""
    rng = np.random.default_rng(7)
    sessions, scores, eps, fas, sg = [], [], [], [], []
    pid = 0
    for clinic, therapists in (("C1", THERAPISTS), ("C2", {"th_bbbbbbbbbbbbbbb1": 4})):
        for th, n_pat in therapists.items():
            for _ in range(n_pat):
                pid += 1
                pt, ep = f"pt_{pid:016x}", f"ep_{pid:016x}"
                start = int(rng.integers(0, 10))
                base_srs = float(rng.normal(35, 3))
                n_sess = int(rng.integers(4, 10))
                prev = None
                for k in range(n_sess):
                    month = dt.date(2025, 1, 1) + dt.timedelta(days=31 * min(start + k // 2, 11))
                    month = month.replace(day=1)
                    se = f"se_{pid:08x}{k:08x}"
                    status = "attended" if rng.random() > 0.15 else str(rng.choice(["no_show", "cancelled"]))
                    sessions.append((se, ep, pt, th, clinic, status, month))
                    if status != "attended":
                        continue
                    srs = float(np.clip(base_srs + rng.normal(0, 2), 10, 40)) if rng.random() > 0.1 else None
                    if srs is not None:
                        scores.append((se, clinic, "alliance"))
                    if rng.random() > 0.2:
                        scores.append((se, clinic, "outcome"))
                    rupture = srs is not None and prev is not None and prev - srs > 4
                    fas.append((se, ep, pt, th, clinic, month, srs, srs is not None and srs < 36,
                                rupture, rupture and rng.random() > 0.4, srs))
                    prev = srs if srs is not None else prev
                pre = float(rng.uniform(10, 24))
                post = float(np.clip(pre - rng.normal(6, 5), 0, 27))
                closed = dt.date(2025, int(rng.integers(1, 13)), 10)
                cat = ("recovered" if pre - post >= 6 and post < 10 else "improved" if pre - post >= 6
                       else "deteriorated" if post - pre >= 6 else "unchanged")
                early = float(np.clip(base_srs + rng.normal(0, 1), 0, 40))
                for inst in ("PHQ-9", "GAD-7"):
                    eps.append((ep, pt, th, clinic, inst, True, closed, pre, post, post - pre, cat,
                                True, pre >= 10, cat == "recovered", pre - post >= 6, post - pre >= 6,
                                early, pre - post >= 6, True, pre - post - 6, 5.0))
                if rng.random() < 0.3:
                    sg.append((ep, pt, th, clinic, "PHQ-9", "gain"))
    con = duckdb.connect(str(path))
    for s in ("raw", "core", "marts", "seeds", "quality"):
        con.execute(f"create schema {s}")
    con.execute("create table raw.events (event_id varchar, recorded_at timestamptz, clinic_id varchar)")
    con.execute("insert into raw.events values ('e1', '2026-01-02 08:00:00+00', 'C1')")
    con.execute("create table raw.quarantine (file_id bigint, source_file varchar, line_number bigint, "
                "reason_code varchar, field varchar, message varchar, line_sha256 varchar, "
                "line_redacted json, recorded_at timestamptz)")
    con.execute("insert into raw.quarantine values "
                "(1, 'a.ndjson', 3, 'out_of_range', 'payload.answers', 'x', 'h', '{\"clinic_id\":\"C1\"}', '2025-12-05'),"
                "(1, 'a.ndjson', 4, 'out_of_range', 'payload.answers', 'x', 'h', '{\"clinic_id\":\"C1\"}', '2025-12-05'),"
                "(1, 'a.ndjson', 5, 'bad_json', null, 'x', 'h', null, '2025-12-05'),"
                "(1, 'a.ndjson', 6, 'unknown_instrument', 'payload.instrument', 'x', 'h', '{\"clinic_id\":\"C2\"}', '2025-12-05'),"
                # processed months later than the events they carry (a late export, a backfill)
                "(2, 'b.ndjson', 1, 'wrong_type', 'occurred_at', 'x', 'h', "
                "'{\"clinic_id\":\"C1\",\"occurred_at\":\"2025-12-14T10:00:00+01:00\"}', '2026-02-03'),"
                "(2, 'b.ndjson', 2, 'wrong_type', 'occurred_at', 'x', 'h', "
                "'{\"clinic_id\":\"C1\",\"occurred_at\":\"2025-12-31T23:30:00-02:00\"}', '2026-02-03'),"
                "(2, 'b.ndjson', 3, 'missing_field', 'occurred_at', 'x', 'h', "
                "'{\"clinic_id\":\"C1\",\"occurred_at\":null}', '2025-12-20 12:00:00+00'),"
                "(2, 'b.ndjson', 4, 'missing_field', 'occurred_at', 'x', 'h', "
                "'{\"clinic_id\":\"C1\",\"occurred_at\":\"2025-11-30T10:00:00+00:00\"}', '2025-12-02')")
    con.execute("create table core.sessions (session_id varchar, episode_id varchar, patient_id varchar, "
                "therapist_id varchar, clinic_id varchar, status varchar, session_month date)")
    _insert(con, "core.sessions", sessions)
    con.execute("create table core.questionnaire_scores (session_id varchar, clinic_id varchar, construct varchar)")
    _insert(con, "core.questionnaire_scores", scores)
    con.execute("create table marts.fct_alliance_sessions (session_id varchar, episode_id varchar, "
                "patient_id varchar, therapist_id varchar, clinic_id varchar, session_month date, "
                "srs_total double, srs_concern boolean, is_candidate_rupture boolean, is_repaired boolean, "
                "alliance_total double)")
    _insert(con, "marts.fct_alliance_sessions", fas)
    con.execute("create table marts.fct_episode_outcomes (episode_id varchar, patient_id varchar, "
                "therapist_id varchar, clinic_id varchar, instrument varchar, is_closed boolean, "
                "closed_at date, first_total double, last_total double, change double, "
                "jt_category varchar, nhstt_eligible boolean, nhstt_case_at_start boolean, "
                "nhstt_recovered boolean, nhstt_reliable_improvement boolean, "
                "nhstt_reliable_deterioration boolean, early_alliance double, reliably_improved boolean, "
                "is_paired boolean, improvement_vs_expected double, network_intake_sd double)")
    _insert(con, "marts.fct_episode_outcomes", eps)
    con.execute("create table marts.fct_sudden_gains (episode_id varchar, patient_id varchar, "
                "therapist_id varchar, clinic_id varchar, instrument varchar, sg_type varchar)")
    _insert(con, "marts.fct_sudden_gains", sg)
    con.execute("""
        create table marts.therapist_summary as
        with s as (select therapist_id, clinic_id, count(distinct patient_id) as patients,
                          count(*) as sessions_attended, avg(srs_total) as mean_alliance
                   from marts.fct_alliance_sessions group by all),
        o as (select therapist_id, count(distinct patient_id) as episodes_paired,
                     avg(reliably_improved::int) as reliable_improvement_rate,
                     avg(-change) / 5 - 1 as severity_adjusted_effect_size
              from marts.fct_episode_outcomes where instrument = 'PHQ-9' group by all)
        select s.*, o.reliable_improvement_rate, o.episodes_paired, o.severity_adjusted_effect_size
        from s left join o using (therapist_id)
    """)
    con.execute("create table marts.alliance_outcome_association (scope varchar, clinic_id varchar, "
                "part varchar, r double, ci_low double, ci_high double, n integer, n_therapists integer, "
                "n_effective integer)")
    con.execute("insert into marts.alliance_outcome_association values "
                "('clinic', 'C1', 'overall', 0.27, 0.05, 0.46, 74, 4, 74),"
                "('clinic', 'C1', 'within_therapist', 0.22, -0.02, 0.43, 74, 4, 71),"
                # as the real mart: n = the therapists' patients, n_effective = therapists
                "('clinic', 'C1', 'between_therapist', 0.5, -0.6, 0.95, 74, 4, 4),"
                "('network', null, 'overall', 0.28, 0.2, 0.36, 500, 30, 500)")
    con.execute("create table seeds.instruments (instrument varchar, instrument_version varchar, "
                "name varchar, construct varchar, higher_is_better boolean, total_min double, "
                "total_max double, reliable_change double, alliance_concern_cutoff double, "
                "alliance_concern_operator varchar, citations varchar)")
    con.execute("insert into seeds.instruments values "
                "('SRS', '1', 'Session Rating Scale', 'alliance', true, 0, 40, null, 36, '<', 'Duncan et al. 2003'),"
                "('PHQ-9', '1', 'Patient Health Questionnaire', 'outcome', false, 0, 27, 6, null, null, 'Kroenke 2001'),"
                "('GAD-7', '1', 'Generalized Anxiety Disorder', 'outcome', false, 0, 21, 4, null, null, 'Spitzer 2006')")
    con.execute("create table seeds.parameters (name varchar, value_double double, value_text varchar, "
                "doc varchar, source varchar)")
    con.execute("insert into seeds.parameters values ('rupture_k_own', 1.5, null, 'k for rule A', 'Eubanks 2018')")
    con.execute("create table quality.check_results (run_id varchar, asset_key varchar, check_name varchar, "
                "passed boolean, severity varchar, unexpected_count bigint, evaluated_at timestamptz)")
    con.execute("insert into quality.check_results values "
                "('r1', 'marts/fct_alliance_sessions', 'srs_in_range', false, 'WARN', 2, '2025-12-20'),"
                "('r1', 'marts/clinic_monthly', 'rates_0_100', true, 'ERROR', 0, '2025-12-20'),"
                # evaluated after the report month: the latest state, shown with its date
                "('r2', 'marts/clinic_monthly', 'rates_0_100', false, 'ERROR', 7, '2026-01-10 06:00:00+00')")
    con.close()
    return path


def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: list[tuple]) -> None:
    cols = [r[0] for r in con.execute(f"describe {table}").fetchall()]
    df = pd.DataFrame(rows, columns=cols)  # noqa: F841 - read by name below
    con.execute(f"insert into {table} select * from df")


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_snapshot(tmp_path_factory.mktemp("serving") / "alliance.duckdb")


@pytest.fixture(scope="module")
def report(snapshot: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reports")
    res = build_report(snapshot, out, "C1", MONTH, Options(min_cell=11))
    assert res.html_path == report_path(out, "C1", MONTH) and res.html_path.exists()
    return res.html_path


def _row(html: str, therapist: str) -> str:
    m = re.search(rf'<tr data-therapist="{therapist}"[^>]*>(.*?)</tr>', html, re.S)
    assert m, therapist
    return m.group(1)


def _cells(fragment: str) -> list[str]:
    return [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", fragment, re.S)]


def test_report_is_self_contained(report: Path) -> None:
    html = report.read_text()
    assert "<script" not in html.lower()
    assert not re.search(r"(src|href)\s*=", html, re.I)
    assert "@import" not in html and "url(http" not in html and "@font-face" not in html
    assert html.count("<svg") >= 6 and "@media print" in html
    for section in ("activity", "alliance", "outcomes", "alliance-outcome", "therapists", "quality", "methods"):
        assert f'id="{section}"' in html


def test_small_therapist_is_suppressed_and_not_derivable(report: Path, snapshot: Path) -> None:
    html = report.read_text()
    small = _cells(_row(html, "th_aaaaaaaaaaaaaaa3"))
    assert small[0] == "th_aaaaaaaaaaaaaaa3" and all(c == "[s]" for c in small[1:])
    # secondary: the next smallest therapist (14 patients) is hidden too
    nxt = _cells(_row(html, "th_aaaaaaaaaaaaaaa4"))
    assert all(c == "[s]" for c in nxt[1:])
    with duckdb.connect(str(snapshot), read_only=True) as con:
        truth = dict(con.execute("select therapist_id, sessions_attended from marts.therapist_summary "
                                 "where clinic_id = 'C1'").fetchall())
    total = _cells(re.search(r'<tr class="total">(.*?)</tr>', html, re.S).group(1))
    shown = [int(_cells(_row(html, t))[2].replace(",", "")) for t in ("th_aaaaaaaaaaaaaaa1", "th_aaaaaaaaaaaaaaa2")]
    remainder = int(total[2].replace(",", "")) - sum(shown)
    # the remainder is the sum of two hidden rows, not the small therapist's own figure
    assert remainder == truth["th_aaaaaaaaaaaaaaa3"] + truth["th_aaaaaaaaaaaaaaa4"]
    assert str(truth["th_aaaaaaaaaaaaaaa3"]) not in small


def test_report_numbers_equal_marts(report: Path, snapshot: Path) -> None:
    html = report.read_text()

    def kpi(name: str) -> str:
        return re.search(rf'id="kpi-{name}">([^<]*)<', html).group(1)

    with duckdb.connect(str(snapshot), read_only=True) as con:
        mean_srs, pct_concern = con.execute(
            "select avg(srs_total), 100.0 * avg(srs_concern::int) from marts.fct_alliance_sessions "
            "where clinic_id = 'C1' and session_month = '2025-12-01' and srs_total is not null").fetchone()
        active, sessions = con.execute(
            "select count(distinct patient_id), count(*) from core.sessions "
            "where clinic_id = 'C1' and session_month = '2025-12-01' and status = 'attended'").fetchone()
        th = con.execute("select sessions_attended, mean_alliance, 100 * reliable_improvement_rate from marts.therapist_summary "
                         "where therapist_id = 'th_aaaaaaaaaaaaaaa1'").fetchone()
    assert kpi("mean-srs") == f"{mean_srs:.1f}"
    # 72.7% of the month's SRS sessions: the sessions without concern are a small count, so rate x n
    # would give it back (protect_numerators); see test_concern_and_completeness_protect_numerators.
    assert kpi("pct-concern") == "[s]" and f"{pct_concern:.1f}" == "72.7"
    assert kpi("active-patients") == f"{active:,}" and kpi("sessions") == f"{sessions:,}"
    row = _cells(_row(html, "th_aaaaaaaaaaaaaaa1"))
    assert row[2] == f"{th[0]:,}" and row[3] == f"{th[1]:.1f}" and row[4] == f"{th[2]:.1f}%"


def test_tiny_clinic_shows_no_exact_figures(snapshot: Path, tmp_path: Path) -> None:
    res = build_report(snapshot, tmp_path, "C2", MONTH)
    html = res.html_path.read_text()
    row = _cells(_row(html, "th_bbbbbbbbbbbbbbb1"))
    assert all(c == "[s]" for c in row[1:])
    total = _cells(re.search(r'<tr class="total">(.*?)</tr>', html, re.S).group(1))
    assert total[1] == "[s]" and total[2] == "[s]"


def test_bad_clinic_and_month_are_clear_errors(snapshot: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="clinic"):
        build_report(snapshot, tmp_path, "../etc", MONTH)
    with pytest.raises(ValueError, match="YYYY-MM"):
        build_report(snapshot, tmp_path, "C1", "December")


# ---------------------------------------------------------------- review findings (issue 7)

def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S)
    assert m, sid
    return m.group(1)


def _quarantine_table(html: str) -> dict[str, int]:
    m = re.search(r'<table id="table-quarantine">(.*?)</table>', html, re.S)
    if not m:
        return {}
    rows = re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", m.group(1))
    return {k: int(v) for k, v in rows}


def test_quarantine_counted_by_event_month_not_processing_month(report: Path, snapshot: Path,
                                                                 tmp_path: Path) -> None:
    """Lines processed in February for December events belong to the December report."""
    html = report.read_text()
    # out_of_range x2 have no event time (dated by receipt, 5 Dec); wrong_type 14 Dec (+01:00) was
    # recorded in February; the one at 31 Dec 23:30 -02:00 is 1 Jan UTC; a 30 Nov event recorded
    # on 2 Dec belongs to November.
    assert _quarantine_table(html) == {"out_of_range": 2, "wrong_type": 1, "missing_field": 1}
    assert re.search(r'id="quarantine-by-received">3 of these have no readable event time', html)
    jan = build_report(snapshot, tmp_path, "C1", "2026-01").html_path.read_text()
    assert _quarantine_table(jan) == {"wrong_type": 1}
    # February, when those lines were processed, had no events of its own.
    feb = build_report(snapshot, tmp_path, "C1", "2026-02").html_path.read_text()
    assert _quarantine_table(feb) == {} and 'id="quarantine-none"' in feb


def test_checks_show_latest_state_with_date_and_period_end_truthfully(report: Path, snapshot: Path,
                                                                      tmp_path: Path) -> None:
    html = _section(report.read_text(), "quality")
    checks = re.search(r'<table id="table-checks">(.*?)</table>', html, re.S).group(1)
    # the ERROR failure evaluated in January (after the report month) is the latest state: shown
    assert "rates_0_100" in checks and "ERROR" in checks and "2026-01-10" in checks
    assert "srs_in_range" in checks
    assert "most recent 2026-01-10" in html
    end = re.search(r'<p id="checks-period-end">(.*?)</p>', html, re.S).group(1)
    assert "At the end of December 2025, 1 of 2 checks were failing" in end and "srs_in_range" in end
    june = _section(build_report(snapshot, tmp_path, "C1", "2025-06").html_path.read_text(), "quality")
    assert "No check evaluation before the end of this period." in june
    assert "All" not in re.search(r'<p id="checks-period-end">(.*?)</p>', june, re.S).group(1)


def test_association_shows_and_suppresses_on_n_effective(report: Path) -> None:
    html = report.read_text()
    table = re.search(r'<table id="table-assoc">(.*?)</table>', html, re.S).group(1)

    def row(part: str) -> list[str]:
        return _cells(re.search(rf'<tr data-part="{part}">(.*?)</tr>', table, re.S).group(1))

    # between therapists: 4 therapists (of 74 patients) -> suppressed although n = 74
    assert row("clinic: between-therapist")[1:] == ["[s]", "[s]", "[s]"]
    assert row("clinic: within-therapist")[3] == "71"
    assert row("clinic: overall")[1:] == ["0.27", "0.05 to 0.46", "74"]
    assert "n (effective)" in table


def _therapist_sessions(html: str) -> dict[str, str]:
    return {t: _cells(_row(html, t))[2] for t in THERAPISTS if f'data-therapist="{t}"' in html}


def test_therapist_table_covers_the_window_ending_with_the_report_month(snapshot: Path,
                                                                        tmp_path: Path) -> None:
    june = build_report(snapshot, tmp_path, "C1", "2025-06", window_months=12).html_path.read_text()
    dec = build_report(snapshot, tmp_path, "C1", "2025-12", window_months=12).html_path.read_text()
    assert _therapist_sessions(june) != _therapist_sessions(dec)
    with duckdb.connect(str(snapshot), read_only=True) as con:
        n, mean = con.execute(
            "select count(*), avg(alliance_total) from marts.fct_alliance_sessions "
            "where therapist_id = 'th_aaaaaaaaaaaaaaa1' and session_month between '2024-07-01' and '2025-06-01'"
        ).fetchone()
        later = con.execute("select count(*) from marts.fct_alliance_sessions where "
                            "therapist_id = 'th_aaaaaaaaaaaaaaa1' and session_month > '2025-06-01'").fetchone()[0]
    assert later > 0  # so an all-time figure would differ
    row = _cells(_row(june, "th_aaaaaaaaaaaaaaa1"))
    assert row[2] == f"{n:,}" and row[3] == f"{mean:.1f}"
    assert "Sessions attended Jul 2024 – Jun 2025" in _section(june, "therapists")


def _raw(**kw: object) -> RawReport:
    from alliance.report.data import Period

    return RawReport(clinic="C9", period=Period(dt.date(2026, 5, 1)), **kw)


def test_concern_and_completeness_protect_numerators() -> None:
    from alliance.report.context import build

    activity = {"active_patients": 12, "booked_patients": 12, "sessions": 16, "appointments": 18,
                "with_alliance": 15, "with_outcome": 8, "alliance_completeness": 15 / 16,
                "outcome_completeness": 0.5, "patients_with_alliance": 12, "patients_without_alliance": 1,
                "patients_with_outcome": 6, "patients_without_outcome": 8}
    alliance = {"srs_sessions": 15, "srs_patients": 12, "concern_sessions": 5, "concern_patients": 4,
                "no_concern_patients": 11, "mean_srs": 35.0}
    bins = [{"lo": 0, "hi": 36, "sessions": 0, "patients": 0, "below_cutoff": True},
            {"lo": 36, "hi": 40, "sessions": 15, "patients": 12, "below_cutoff": False}]
    ctx = build(_raw(activity=activity, alliance=alliance, srs_bins=bins), Options(min_cell=11))
    # 33.3% of 15 = 5 concern sessions
    assert ctx["alliance"]["pct_concern"].is_suppressed
    # 93.8% of 16 sessions: shown, since 16 (sessions attended) and 15 (the SRS table's All) are
    # both in the report; hiding the ratio would protect nothing
    assert not ctx["activity"]["with_alliance"].is_suppressed
    assert not ctx["activity"]["sessions"].is_suppressed and not ctx["alliance"]["srs_sessions"].is_suppressed
    # 50% of 16 = 8 with an outcome score: small too (and only 6 patients)
    assert ctx["activity"]["with_outcome"].is_suppressed
    ctx = build(_raw(activity=activity, alliance=alliance, srs_bins=bins),
                Options(min_cell=11, protect_numerators=False))
    assert not ctx["activity"]["with_alliance"].is_suppressed
    assert not ctx["alliance"]["pct_concern"].is_suppressed


def _unknowns(values: dict[str, Shown | None]) -> int:
    return sum(1 for v in values.values() if v is not None and v.is_suppressed)


def test_early_alliance_bands_cannot_be_recovered_from_jacobson_truax() -> None:
    """The reviewer's case: band 0-30 shows n=18 with its rate hidden; R+I minus shown bands gave it back."""
    from alliance.report.context import build

    bands = [{"lo": 0, "hi": 30, "patients": 18, "improved": 4},
             {"lo": 30, "hi": 36, "patients": 40, "improved": 22},
             {"lo": 36, "hi": 38, "patients": 30, "improved": 18},
             {"lo": 38, "hi": 40, "patients": 25, "improved": 16}]
    jt = [{"instrument": "PHQ-9", "counts": {"recovered": 35, "improved": 25, "unchanged": 40,
                                             "deteriorated": 13, "harmed": 0}},
          {"instrument": "GAD-7", "counts": {"recovered": 50, "improved": 20, "unchanged": 43,
                                             "deteriorated": 0, "harmed": 0}}]
    ctx = build(_raw(early_bins=bands, jt=jt, outcome_instrument="PHQ-9"), Options(min_cell=11))
    eb = {lbl: (rate, size) for lbl, rate, size in ctx["early_bins"]}
    assert eb["0–30"][0].is_suppressed and not eb["0–30"][1].is_suppressed  # the reviewer's cell
    phq = next(r for r in ctx["jt"] if r["instrument"] == "PHQ-9")
    c = phq["counts"]
    # recovered + improved = sum of the bands' improved counts: at least two unknowns in it
    assert _unknowns({**{k: r for k, (r, _) in eb.items()}, "R": c["recovered"], "I": c["improved"]}) >= 2
    assert _unknowns({**{k: r for k, (r, _) in eb.items()}, "U": c["unchanged"],
                      "D": c["deteriorated"], "H": c["harmed"]}) >= 2
    assert _unknowns(c) != 1 and _unknowns({k: s for k, (_, s) in eb.items()}) != 1
    # the chart and table name the instrument of the correlation
    assert "on PHQ-9" in ctx["early_svg"]
    # the Jacobson-Truax chart shows the outcome instrument, also where another has more episodes
    jt[1]["counts"]["recovered"] = 80
    ctx = build(_raw(early_bins=bands, jt=jt, outcome_instrument="PHQ-9"), Options(min_cell=11))
    assert ctx["jt_main"] == "PHQ-9" and "categories, PHQ-9" in ctx["jt_svg"]


def test_recoverable_finds_cells_isolated_across_tables() -> None:
    from alliance.report.suppress import recoverable, suppress_relations

    # cells: 0,1 bands' improved counts; 2 R, 3 I (Jacobson-Truax); relation k0 + k1 = R + I
    rel = [{0: 1.0, 1: 1.0, 2: -1.0, 3: -1.0}]
    assert recoverable(rel, {0}) == [0]  # the reviewer's case: one band hidden, R and I shown
    assert recoverable(rel, {0, 1}) == []
    # two relations sharing a hidden cell can isolate one that each alone cannot
    rel2 = [{0: 1.0, 1: 1.0, 4: -1.0}, {1: 1.0, 4: -1.0}]
    assert recoverable(rel2, {0, 1}) == [0, 1]
    out = suppress_relations([18, 40, 35, 25, 60], rel, ["primary", None, None, None, None])
    assert recoverable(rel, {i for i, r in enumerate(out) if r}) == []
    assert out[3] == "secondary"  # the smallest shown cell of the relation


def test_early_alliance_chart_uses_the_association_instrument(report: Path) -> None:
    html = _section(report.read_text(), "alliance-outcome")
    # PHQ-9 and GAD-7 have the same number of rows here: the old rule picked GAD-7 alphabetically
    assert "Reliable improvement on PHQ-9 by early alliance" in html and "GAD-7" not in html


@pytest.mark.parametrize("bad", [-3, 0, 1, "x", 2.5])
def test_min_cell_below_two_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match=r"min_cell: .* at least 2"):
        Options(min_cell=bad)  # type: ignore[arg-type]


def test_min_cell_from_env_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from alliance.report.context import min_cell_from_env, validate_min_cell

    monkeypatch.setenv("ALLIANCE_MIN_CELL", "0")
    with pytest.raises(ValueError, match="ALLIANCE_MIN_CELL: '0'"):
        min_cell_from_env()
    monkeypatch.setenv("ALLIANCE_MIN_CELL", "5")
    assert min_cell_from_env() == 5
    with pytest.raises(ValueError, match="--min-cell"):
        validate_min_cell(0, "--min-cell")


# ---------------------------------------------------------------- real headless Chromium

BROWSER_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.mark.browser
def test_report_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    require_present(CHROMIUM, "chromium (Debian package)", "`make browser` installs it")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    requests: list[str] = []
    shot = tmp_path / "report.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 1200})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(report.resolve().as_uri(), wait_until="load")
            ids = page.eval_on_selector_all("svg.chart", "els => els.map(e => e.id)")
            sizes = page.eval_on_selector_all(
                "svg.chart", "els => els.map(e => e.getBoundingClientRect().height)")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert requests == [report.resolve().as_uri()]
    assert set(ids) >= {"chart-trend", "chart-srs-dist", "chart-jt", "chart-nhstt", "chart-prepost",
                        "chart-early", "chart-assoc"}
    assert all(h > 50 for h in sizes)
    assert shot.exists() and shot.stat().st_size > 20_000


# ---------------------------------------------------------------- Dagster asset and CLI

def _data_dir(snapshot: Path, root: Path) -> Path:
    import shutil

    (root / "serving").mkdir(parents=True)
    shutil.copy(snapshot, root / "serving" / "alliance.duckdb")
    return root


def test_dagster_asset_renders_partition(snapshot: Path, tmp_path: Path) -> None:
    import dagster as dg

    from assets.reports import clinic_report
    from orchestration.partitions import add_clinic_partitions, report_partition_key
    from orchestration.resources import AllianceSettings

    root = _data_dir(snapshot, tmp_path / "data")
    instance = dg.DagsterInstance.ephemeral()
    assert add_clinic_partitions(instance, root / "serving" / "alliance.duckdb") == ["C1", "C2"]
    assert add_clinic_partitions(instance, root / "serving" / "alliance.duckdb") == []
    result = dg.materialize(
        [clinic_report], instance=instance, partition_key=report_partition_key("C1", MONTH),
        resources={"settings": AllianceSettings(data_dir=str(root))},
    )
    assert result.success
    mat = result.asset_materializations_for_node("reports__clinic_report")[0]
    assert mat.partition == "C1|2025-12" and mat.metadata["charts"].value >= 6
    assert (root / "reports" / "C1" / "2025-12.html").exists()


def test_cli_report(snapshot: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestration.cli import main

    root = _data_dir(snapshot, tmp_path / "data")
    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(root))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    assert main(["report", "--clinic", "C2", "--month", MONTH]) == 0
    assert (root / "reports" / "C2" / "2025-12.html").exists()
    assert main(["report", "--clinic", "NOPE", "--month", MONTH]) == 1


def test_dg_launch_partition_range_renders_every_key(snapshot: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A real `dg launch --partition-range` (clinics C1..C2 x two months) in one run."""
    import os
    import subprocess

    import dagster as dg

    from alliance.config import REPO_ROOT
    from orchestration.instance import get_instance
    from orchestration.partitions import add_clinic_partitions

    root = _data_dir(snapshot, tmp_path / "data")
    env = {**os.environ, "ALLIANCE_DATA_DIR": str(root), "DAGSTER_HOME": str(root / "dagster"),
           "ALLIANCE_AUTOMATION": "off"}
    for k in ("ALLIANCE_DATA_DIR", "DAGSTER_HOME"):
        monkeypatch.setenv(k, env[k])
    instance = get_instance()
    assert add_clinic_partitions(instance, root / "serving" / "alliance.duckdb") == ["C1", "C2"]
    dg_bin = Path(sys.executable).with_name("dg")
    proc = subprocess.run(
        [str(dg_bin), "launch", "--assets", "reports/clinic_report",
         "--partition-range", "C1|2025-11...C2|2025-12"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = sorted(str(f.relative_to(root / "reports")) for f in (root / "reports").rglob("*.html"))
    assert written == ["C1/2025-11.html", "C1/2025-12.html", "C2/2025-11.html", "C2/2025-12.html"]
    instance = dg.DagsterInstance.from_config(str(root / "dagster"))  # fresh view of the runs
    key = dg.AssetKey(["reports", "clinic_report"])
    assert sorted(instance.get_materialized_partitions(key)) == [
        "C1|2025-11", "C1|2025-12", "C2|2025-11", "C2|2025-12"]
    assert len(instance.get_runs()) == 1  # one run for the whole range
    mat = instance.get_latest_materialization_event(key).asset_materialization
    assert mat.metadata["partitions_rendered"].value == 4
    assert "C2|2025-12" in mat.metadata["reports"].value


# ---------------------------------------------------------------- the real pipeline's marts

@pytest.fixture(scope="module")
def pipeline_snapshot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Simulate a small network, ingest, seed and build every model: a real snapshot file."""
    from alliance.config import SQL_DIR
    from alliance.ingest import ingest_files, landing_files
    from alliance.instruments import load_instruments, write_parameters_table, write_seed_tables
    from alliance.simulation import simulate
    from alliance.sqlrunner import run_models

    tmp = tmp_path_factory.mktemp("pipeline")
    simulate(tmp / "landing", patients=400, truth_path=tmp / "truth.json")
    db = tmp / "serving" / "alliance.duckdb"
    db.parent.mkdir()
    with duckdb.connect(str(db)) as con:
        ingest_files(con, landing_files(tmp / "landing"), b"report-test-key-0123456789abcdef01234",
                     quarantine_dir=tmp / "quarantine")
        write_seed_tables(con, load_instruments())
        write_parameters_table(con, SQL_DIR / "parameters.yml")
        run_models(con)
    return db


def test_report_equals_real_marts(pipeline_snapshot: Path, tmp_path: Path) -> None:
    with duckdb.connect(str(pipeline_snapshot), read_only=True) as con:
        clinic, month, patients, sessions, mean_alliance, concern = con.execute("""
            select clinic_id, month, patients, sessions_attended, mean_alliance, srs_concern_rate
            from marts.clinic_monthly where scope = 'clinic' and patients >= 11
            order by patients desc, month desc limit 1""").fetchone()
        ths = con.execute("select therapist_id, patients, sessions_attended, mean_alliance "
                          "from marts.therapist_summary where clinic_id = ?", [clinic]).fetchall()
    key = f"{month:%Y-%m}"
    html = build_report(pipeline_snapshot, tmp_path, clinic, key).html_path.read_text()

    def kpi(name: str) -> str:
        return re.search(rf'id="kpi-{name}">([^<]*)<', html).group(1)

    assert kpi("active-patients") == f"{patients:,}" and kpi("sessions") == f"{sessions:,}"
    assert kpi("mean-srs") == f"{mean_alliance:.1f}"
    with duckdb.connect(str(pipeline_snapshot), read_only=True) as con:
        small_counts = con.execute("""
            select count(*) filter (where srs_concern), count(*) filter (where not srs_concern),
                   count(distinct patient_id) filter (where srs_concern),
                   count(distinct patient_id) filter (where not srs_concern)
            from marts.fct_alliance_sessions
            where clinic_id = ? and session_month = ? and srs_total is not null""", [clinic, month]).fetchone()
    protected = any(0 < c < 11 for c in small_counts)
    assert kpi("pct-concern") == ("[s]" if protected else f"{100 * concern:.1f}%")
    # The therapist table covers the window ending with the report month; with a window from the
    # first month of data to the last it covers what marts.therapist_summary (all time) covers.
    with duckdb.connect(str(pipeline_snapshot), read_only=True) as con:
        first, last = con.execute("select min(session_month), max(session_month) "
                                  "from marts.fct_alliance_sessions").fetchone()
    span = (last.year - first.year) * 12 + last.month - first.month + 1
    html = build_report(pipeline_snapshot, tmp_path, clinic, f"{last:%Y-%m}",
                        window_months=span).html_path.read_text()
    # (over all time every therapist of the fixture has 11+ patients: nothing may be hidden)
    assert ths and all(t[1] >= 11 for t in ths)
    for tid, n_pat, n_sess, mean_a in ths:
        assert _cells(_row(html, tid))[1:4] == [f"{n_pat:,}", f"{n_sess:,}", f"{mean_a:.1f}"]

    # A shorter window, where therapists with 1-10 patients sit beside larger ones: those rows
    # are hidden whole, and when exactly one is, the smallest other row too (else the total minus
    # the shown rows gives it back). (Window lengths tried in turn; one small row preferred.)
    candidates = []
    with duckdb.connect(str(pipeline_snapshot), read_only=True) as con:
        for w in (2, 3, 4, 6, 9, 12):
            candidates += [(w, *row) for row in con.execute(f"""
                with ends as (select distinct clinic_id, session_month as m
                              from marts.fct_alliance_sessions),
                p as (select e.clinic_id, e.m, f.therapist_id, count(distinct f.patient_id) as n,
                             count(*) as sessions
                      from ends e join marts.fct_alliance_sessions f on f.clinic_id = e.clinic_id
                          and f.session_month > e.m - interval {w} month and f.session_month <= e.m
                      where f.therapist_id is not null group by all)
                select clinic_id, m, list({{'therapist_id': therapist_id, 'n': n, 'sessions': sessions}}
                                       order by therapist_id),
                       count(*) filter (where n < 11) as small
                from p group by all having count(*) filter (where n >= 11) >= 2 and small >= 1
                order by small = 1 desc, m desc, clinic_id limit 1""").fetchall()]
    assert candidates, "the fixture has no window with a small therapist beside larger ones"
    w, c, m, rows, n_small = min(candidates, key=lambda x: (x[4] != 1, x[0]))
    assert n_small == 1  # the fixture has one: the complementary suppression is exercised
    html = build_report(pipeline_snapshot, tmp_path, c, f"{m:%Y-%m}",
                        window_months=w).html_path.read_text()
    small = {r["therapist_id"] for r in rows if r["n"] < 11}
    expect_hidden = set(small)
    if n_small == 1:  # the complement: the smallest non-zero row besides it
        expect_hidden.add(min((r for r in rows if r["therapist_id"] not in small),
                              key=lambda r: (r["n"], r["therapist_id"]))["therapist_id"])
    for r in rows:
        cells = _cells(_row(html, r["therapist_id"]))
        if r["therapist_id"] in expect_hidden:
            assert cells[1:4] == ["[s]"] * 3, (r, cells)
        else:
            assert cells[1:3] == [f"{r['n']:,}", f"{r['sessions']:,}"], (r, cells)


def test_cli_refuses_a_small_cell_threshold_below_two(monkeypatch, capsys, tmp_path):
    from orchestration.cli import main

    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["report", "--clinic", "C1", "--month", "2026-01", "--min-cell", "0"])
    assert e.value.code == 2 and "--min-cell" in capsys.readouterr().err
    monkeypatch.setenv("ALLIANCE_MIN_CELL", "1")
    assert main(["report", "--clinic", "C1", "--month", "2026-01"]) == 2
    assert "ALLIANCE_MIN_CELL" in capsys.readouterr().err


def test_cli_month_outside_the_partitions_is_one_line_error(monkeypatch, capsys, tmp_path):
    from orchestration.cli import main

    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(tmp_path))
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "alliance.duckdb").write_bytes(b"")  # only its existence matters
    assert main(["report", "--clinic", "C1", "--month", "1999-01"]) == 2
    err = capsys.readouterr().err
    assert "no report partition for 1999-01" in err and "Traceback" not in err


def test_cli_report_before_a_future_reports_start_says_why(tmp_path):
    """With $ALLIANCE_REPORTS_START after the last complete month there is no month yet; it said
    the months ran from that month to itself."""
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "alliance.duckdb").write_bytes(b"")  # only its existence matters
    run = subprocess.run([sys.executable, "-m", "orchestration.cli", "report", "--clinic", "C1",
                          "--month", "2026-01"], cwd=REPO_ROOT, capture_output=True, text=True,
                         env={**os.environ, "ALLIANCE_DATA_DIR": str(tmp_path),
                              "ALLIANCE_REPORTS_START": "2999-01"}, timeout=120)
    assert run.returncode == 2, run.stderr
    assert ("no month is reported yet, because $ALLIANCE_REPORTS_START=2999-01 is after the last "
            "complete month") in run.stderr and "Traceback" not in run.stderr


def test_cli_user_errors_are_one_line_not_tracebacks(monkeypatch, capsys, tmp_path):
    """A month that does not exist, or no pseudonym key, is a one-line error with exit code 2;
    `alliance ingest` without a key copies nothing into landing/."""
    from orchestration.cli import main

    monkeypatch.setenv("ALLIANCE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("ALLIANCE_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("ALLIANCE_DEMO", raising=False)
    assert main(["report", "--clinic", "C1", "--month", "2026-13"]) == 2
    assert "month '2026-13': expected YYYY-MM" in capsys.readouterr().err
    export = tmp_path / "export.ndjson"
    export.write_text("{}\n")
    assert main(["ingest", str(export)]) == 2
    err = capsys.readouterr().err
    assert "ALLIANCE_PSEUDONYM_KEY is not set" in err and "Traceback" not in err
    assert not any((tmp_path / "data" / "landing").glob("*"))
    # the rebuild starts with the ingest: no run is started without the key
    assert main(["run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alliance run: ALLIANCE_PSEUDONYM_KEY is not set") and "Traceback" not in err
    # ... nor a selection that includes it
    assert main(["run", "--select", 'key:"raw/events"']) == 2
    assert "ALLIANCE_PSEUDONYM_KEY is not set" in capsys.readouterr().err
    # requests that cannot work on an empty warehouse are refused before any run starts
    assert main(["run", "--select", "group:marts"]) == 2
    out = capsys.readouterr()
    assert "the warehouse has no events yet" in out.err and "Traceback" not in out.err + out.out
    assert main(["run", "--as-of", "2026-01-01"]) == 2
    assert "the warehouse has no events yet" in capsys.readouterr().err
    assert main(["run", "--as-of", "2026-01-01", "--clinic", "C1", "--month", "2025-13"]) == 2
    assert "month '2025-13': expected YYYY-MM" in capsys.readouterr().err
    # report errors go to stderr: stdout carries only the report's path
    assert main(["report", "--clinic", "C1", "--month", "2026-01"]) == 1
    out = capsys.readouterr()
    assert not out.out and "no published snapshot yet" in out.err
    monkeypatch.setenv("ALLIANCE_DEMO", "1")
    (tmp_path / "export.csv").write_text("id,score\n1,2\n")
    assert main(["ingest", str(tmp_path / "export.csv")]) == 2
    assert "not an NDJSON export" in capsys.readouterr().err
    assert not any((tmp_path / "data" / "landing").glob("*"))
    # pseudonym --demo without a demo key made a new key: a pseudonym that matches nothing
    assert main(["pseudonym", "--demo", "patient", "clinic-01", "PAT-1"]) == 2
    assert "no demo key" in capsys.readouterr().err
    assert not (tmp_path / "data" / "secrets" / "demo_pseudonym_key").exists()
    # an empty identifier is missing at ingest (it printed a pseudonym nothing carries), and
    # without --demo the key is read as the pipeline reads it (ALLIANCE_DEMO=1: the demo key)
    monkeypatch.setenv("ALLIANCE_PSEUDONYM_KEY", "k" * 40)
    assert main(["pseudonym", "patient", "clinic-01", " "]) == 2
    assert "empty or blank" in capsys.readouterr().err
    assert main(["pseudonym", "patient", "", "PAT-1"]) == 2
    assert "does not match" in capsys.readouterr().err
    assert main(["pseudonym", "patient", "clinic-01", "PAT-1"]) == 0
    assert capsys.readouterr().out.startswith("pt_")
    # --clinic/--month without --as-of was silently a full nightly rebuild
    assert main(["run", "--clinic", "C1", "--month", "2026-01"]) == 2
    assert "go with --as-of" in capsys.readouterr().err


def _kpi(html: str, kpi_id: str) -> str:
    return re.search(rf'id="{kpi_id}">([^<]*)<', html).group(1)


def test_month_without_sessions_says_so_instead_of_suppressing_zeros(snapshot: Path,
                                                                    tmp_path: Path) -> None:
    """A month after the clinic's last session: its zeros rest on no patient, so they are shown
    as zeros or dashes with a notice naming the latest month with a session, not as [s]."""
    with duckdb.connect(str(snapshot), read_only=True) as con:
        last = con.execute("select max(session_month) from core.sessions where clinic_id = 'C1' "
                           "and status = 'attended'").fetchone()[0]
    month = f"{last.year + (last.month + 2) // 12}-{(last.month + 2) % 12 + 1:02d}"  # 3 later
    html = build_report(snapshot, tmp_path, "C1", month).html_path.read_text()
    notice = re.search(r'id="idle-month">(.*?)</p>', html, re.S).group(1)
    assert f"the latest month with one is {last:%B %Y}" in notice
    assert _kpi(html, "kpi-active-patients") == "0" and _kpi(html, "kpi-sessions") == "0"
    for kpi in ("kpi-attendance", "kpi-with-alliance", "kpi-mean-srs", "kpi-pct-concern"):
        assert _kpi(html, kpi) == "–", kpi
    assert "[s]" not in _section(html, "activity")
    # a month with sessions has no notice
    assert 'id="idle-month"' not in build_report(snapshot, tmp_path, "C1", f"{last:%Y-%m}") \
        .html_path.read_text()


def test_trend_axis_reaches_down_to_a_shown_low_month_but_not_a_suppressed_one() -> None:
    from alliance.report.context import build

    def trend_axis(rows: list[dict]) -> list[str]:
        svg = build(_raw(trend=rows), Options(min_cell=11))["trend_svg"]
        return re.findall(r"text-anchor='end' fill='[^']*'>(\d+)</text>", svg)

    month = dt.date(2026, 5, 1)
    assert trend_axis([{"month": month, "mean_srs": 31.0, "patients": 20}])[0] == "20"
    # 17.4 shown: the axis starts at 15, so the point is drawn where its label says
    assert trend_axis([{"month": month, "mean_srs": 17.4, "patients": 20}])[0] == "15"
    # 12.0 over 3 patients is suppressed: the axis must not hint at it
    assert trend_axis([{"month": month, "mean_srs": 12.0, "patients": 3}])[0] == "20"


def test_hidden_concern_rate_cannot_be_recovered_from_the_srs_bars() -> None:
    """The concern count is the sum of the bars below the cutoff and the shown total minus the
    bars above it: when the rate is hidden, each side keeps a hidden bar (the reviewer's case:
    75 - 30 - 40 gave back the 5 concern sessions)."""
    from alliance.report.context import build

    alliance = {"srs_sessions": 75, "srs_patients": 25, "concern_sessions": 5,
                "concern_patients": 4, "no_concern_patients": 24, "mean_srs": 36.5}
    counts = [(0, 20, 0, 0), (20, 26, 0, 0), (26, 30, 0, 0), (30, 33, 0, 0), (33, 36, 5, 4),
              (36, 38, 30, 14), (38, 40, 40, 15)]
    bins = [{"lo": lo, "hi": hi, "sessions": n, "patients": p, "below_cutoff": hi <= 36}
            for lo, hi, n, p in counts]
    ctx = build(_raw(alliance=alliance, srs_bins=bins), Options(min_cell=11))
    assert ctx["alliance"]["pct_concern"].is_suppressed
    shown = [(s, low) for _, s, low in ctx["srs_bins"]]
    assert any(s.is_suppressed for s, low in shown if low)
    assert any(s.is_suppressed for s, low in shown if not low)
    # no ruptures: the repair rate is "no data", not a suppressed figure
    ctx = build(_raw(alliance={**alliance, "ruptures": 0, "rupture_patients": 0, "repaired": 0},
                     srs_bins=bins), Options(min_cell=11))
    assert ctx["alliance"]["pct_repaired"].value is None
    assert not ctx["alliance"]["pct_repaired"].is_suppressed


def test_the_repair_rate_leaves_out_ruptures_still_pending(pipeline_snapshot: Path, tmp_path: Path):
    """A rupture in the window's last weeks (episode open, its repair window not over) was counted
    as unrepaired, which pulled every report's repair rate down."""
    with duckdb.connect(str(pipeline_snapshot), read_only=True) as con:
        first, last = con.execute("select min(session_month), max(session_month) "
                                  "from marts.fct_alliance_sessions").fetchone()
        clinic = con.execute("select clinic_id from marts.fct_alliance_sessions "
                             "where repair_status = 'pending' group by all "
                             "order by count(*) desc, clinic_id limit 1").fetchone()[0]
        statuses = con.execute("select repair_status from marts.fct_alliance_sessions "
                               "where clinic_id = ? and is_candidate_rupture", [clinic]).fetchall()
    span = (last.year - first.year) * 12 + last.month - first.month + 1
    repaired = sum(s == "repaired" for (s,) in statuses)
    decided = sum(s in ("repaired", "unrepaired") for (s,) in statuses)
    assert decided < len(statuses)  # some are pending
    # (a low threshold: the figure is shown, not suppressed, whatever the fixture's small counts)
    html = build_report(pipeline_snapshot, tmp_path, clinic, f"{last:%Y-%m}", Options(min_cell=3),
                        window_months=span).html_path.read_text()
    shown = re.search(r'id="kpi-repaired">([^<]*)<', html).group(1)
    assert shown == f"{100 * repaired / decided:.1f}%", (shown, repaired, decided, len(statuses))
    assert "still pending in this snapshot's data are not counted" in html


def test_outcome_counts_agree_across_the_report(pipeline_snapshot: Path, tmp_path: Path) -> None:
    """Patients are counted once (their latest episode closed in the window) in the
    Jacobson-Truax table and the pre-post means, which take paired episodes only; sudden gains
    count the patients the criteria could judge; the association lists overall, within,
    between; with the operator `<=` a score at the cutoff is in a concern bar."""
    import shutil

    from alliance.report.data import Period, extract

    with duckdb.connect(str(pipeline_snapshot), read_only=True) as con:
        clinic, last = con.execute("select clinic_id, max(closed_at) from marts.fct_episode_outcomes "
                                   "where is_closed group by 1 order by count(*) desc limit 1").fetchone()
        period = Period(dt.date(last.year, last.month, 1))
        raw = extract(con, clinic, period)
        latest = """from (select * from marts.fct_episode_outcomes where clinic_id = ? and is_closed
                        and closed_at >= ? and closed_at < ? qualify row_number() over (
                        partition by patient_id, instrument order by closed_at desc, episode_id desc) = 1)"""
        args = [clinic, period.window_start, period.month_end]
        jt_total = con.execute(f"select count(*) {latest} where instrument = 'PHQ-9' "
                               "and jt_category is not null", args).fetchone()[0]
        paired = con.execute(f"select count(*) {latest} where instrument = 'PHQ-9' and is_paired "
                             "and first_total is not null and last_total is not null",
                             args).fetchone()[0]
        judged = con.execute("select count(distinct patient_id) from marts.fct_episode_outcomes "
                             "where clinic_id = ? and is_closed and closed_at >= ? and closed_at < ? "
                             "and instrument = 'PHQ-9' and n_scores >= 4", args).fetchone()[0]
    phq = next(r for r in raw.jt if r["instrument"] == "PHQ-9")
    assert sum(phq["counts"].values()) == jt_total
    assert next(r for r in raw.pre_post if r["instrument"] == "PHQ-9")["patients"] == paired
    assert raw.sudden["patients"] == judged
    clinic_rows = [r["part"] for r in raw.association if r["scope"].startswith("clinic")]
    assert clinic_rows == ["overall", "within_therapist", "between_therapist"]

    le = tmp_path / "le.duckdb"
    shutil.copy(pipeline_snapshot, le)
    with duckdb.connect(str(le)) as con:
        con.execute("update seeds.instruments set alliance_concern_operator = '<=' "
                    "where instrument = 'SRS'")
        con.execute("update marts.fct_alliance_sessions set srs_concern = srs_total <= 36")
        month = con.execute("select session_month from marts.fct_alliance_sessions where "
                            "clinic_id = ? and srs_total = 36 group by 1 order by count(*) desc "
                            "limit 1", [clinic]).fetchone()[0]
        raw = extract(con, clinic, Period(month))
        concern = con.execute("select count(*) from marts.fct_alliance_sessions where clinic_id = ? "
                              "and session_month = ? and srs_concern", [clinic, month]).fetchone()[0]
    assert raw.srs_operator == "<="
    assert sum(b["sessions"] for b in raw.srs_bins if b["below_cutoff"]) == concern
