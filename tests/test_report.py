"""Clinic reports: suppression rules, rendering from a snapshot, real headless Chromium, Dagster asset."""

from __future__ import annotations

import datetime as dt
import re
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from alliance.report import Options, build_report, report_path
from alliance.report.suppress import (
    PRIMARY,
    SECONDARY,
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
                                rupture, rupture and rng.random() > 0.4))
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
                                early, pre - post >= 6))
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
                "(1, 'a.ndjson', 6, 'unknown_instrument', 'payload.instrument', 'x', 'h', '{\"clinic_id\":\"C2\"}', '2025-12-05')")
    con.execute("create table core.sessions (session_id varchar, episode_id varchar, patient_id varchar, "
                "therapist_id varchar, clinic_id varchar, status varchar, session_month date)")
    _insert(con, "core.sessions", sessions)
    con.execute("create table core.questionnaire_scores (session_id varchar, clinic_id varchar, construct varchar)")
    _insert(con, "core.questionnaire_scores", scores)
    con.execute("create table marts.fct_alliance_sessions (session_id varchar, episode_id varchar, "
                "patient_id varchar, therapist_id varchar, clinic_id varchar, session_month date, "
                "srs_total double, srs_concern boolean, is_candidate_rupture boolean, is_repaired boolean)")
    _insert(con, "marts.fct_alliance_sessions", fas)
    con.execute("create table marts.fct_episode_outcomes (episode_id varchar, patient_id varchar, "
                "therapist_id varchar, clinic_id varchar, instrument varchar, is_closed boolean, "
                "closed_at date, first_total double, last_total double, change double, "
                "jt_category varchar, nhstt_eligible boolean, nhstt_case_at_start boolean, "
                "nhstt_recovered boolean, nhstt_reliable_improvement boolean, "
                "nhstt_reliable_deterioration boolean, early_alliance double, reliably_improved boolean)")
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
                "part varchar, r double, ci_low double, ci_high double, n integer)")
    con.execute("insert into marts.alliance_outcome_association values "
                "('clinic', 'C1', 'overall', 0.27, 0.05, 0.46, 74),"
                "('clinic', 'C1', 'within_therapist', 0.22, -0.02, 0.43, 74),"
                "('clinic', 'C1', 'between_therapist', 0.5, -0.6, 0.95, 4),"
                "('network', null, 'overall', 0.28, 0.2, 0.36, 500)")
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
                "('r1', 'marts/clinic_monthly', 'rates_0_100', true, 'ERROR', 0, '2025-12-20')")
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
    assert kpi("pct-concern") == f"{pct_concern:.1f}%"
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


# ---------------------------------------------------------------- real headless Chromium

BROWSER_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.mark.browser
def test_report_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing: install it with `make browser` (Debian package chromium)")
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
    assert kpi("pct-concern") == f"{100 * concern:.1f}%"
    big = [t for t in ths if t[1] >= 11]
    small = [t for t in ths if t[1] < 11]
    for tid, _, n_sess, mean_a in big:
        row = _cells(_row(html, tid))
        if row[1] != "[s]":  # a large therapist may be a secondary suppression
            assert row[2] == f"{n_sess:,}" and row[3] == f"{mean_a:.1f}"
    for t in small:
        assert all(c == "[s]" for c in _cells(_row(html, t[0]))[1:])
    hidden = sum(1 for t in ths if _cells(_row(html, t[0]))[1] == "[s]")
    assert hidden in (0,) or hidden >= 2
