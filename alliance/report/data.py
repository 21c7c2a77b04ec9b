"""Extract one clinic-month's figures from the published snapshot (read-only), before suppression.

Every figure comes with its base (patients it rests on) so that suppression can be applied later
by `alliance.report.context`. Only the serving snapshot is read, never the working warehouse.
Where a mart or column is missing (an older snapshot), the section is returned as None and the
report says "not available in this snapshot" instead of failing.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import duckdb

# Outcomes, ruptures, therapists and the association rest on few patients per month, so they are
# computed over a trailing window ending with the report month (documented in docs/reports.md).
DEFAULT_WINDOW_MONTHS = 12


@dataclass
class Period:
    """The report month and the trailing window used for slower-moving figures."""

    month: dt.date  # first day of the report month
    window_months: int = DEFAULT_WINDOW_MONTHS

    @property
    def month_end(self) -> dt.date:
        return add_months(self.month, 1)

    @property
    def window_start(self) -> dt.date:
        return add_months(self.month, -(self.window_months - 1))

    @property
    def label(self) -> str:
        return self.month.strftime("%B %Y")

    @property
    def key(self) -> str:
        return self.month.strftime("%Y-%m")


def add_months(d: dt.date, n: int) -> dt.date:
    """First day of the month n months after d's month."""
    m = d.year * 12 + d.month - 1 + n
    return dt.date(m // 12, m % 12 + 1, 1)


def parse_month(text: str) -> dt.date:
    """'YYYY-MM' (or 'YYYY-MM-DD') -> first day of that month; a clear error otherwise."""
    try:
        parts = [int(p) for p in text.strip().split("-")[:2]]
        return dt.date(parts[0], parts[1], 1)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"month {text!r}: expected YYYY-MM, e.g. 2026-03") from exc


@dataclass
class RawReport:
    """Unsuppressed figures for one clinic and month, each with its patient base."""

    clinic: str
    period: Period
    data_as_of: str | None = None
    activity: dict[str, Any] | None = None
    trend: list[dict[str, Any]] = field(default_factory=list)
    srs_cutoff: float = 36.0
    srs_operator: str = "<"
    srs_bins: list[dict[str, Any]] = field(default_factory=list)
    alliance: dict[str, Any] | None = None
    jt: list[dict[str, Any]] | None = None  # per instrument: counts by category
    nhstt: dict[str, Any] | None = None
    pre_post: list[dict[str, Any]] | None = None
    sudden: dict[str, Any] | None = None
    early_bins: list[dict[str, Any]] | None = None
    association: list[dict[str, Any]] | None = None
    therapists: list[dict[str, Any]] | None = None
    # True: therapist figures over the trailing window (fct_ tables); False: the mart's all-time row.
    therapists_windowed: bool = True
    # Outcome instrument of the association, the therapist outcome columns and the early-alliance
    # chart (parameter assoc_outcome_instrument), so that all three describe the same episodes.
    outcome_instrument: str = "PHQ-9"
    quarantine: list[dict[str, Any]] | None = None
    quarantine_unattributed: int = 0
    quarantine_by_received: int = 0  # of the clinic's lines: no readable event time, dated by receipt
    # Check state at its latest evaluation in the snapshot, and as it was at the end of the period
    # (None: no evaluation before then). Each: {"checks", "evaluated_to", "failing": [...]}.
    checks_latest: dict[str, Any] | None = None
    checks_period_end: dict[str, Any] | None = None
    check_history: bool = False
    instruments: list[dict[str, Any]] = field(default_factory=list)
    parameters: list[dict[str, Any]] = field(default_factory=list)


def _rows(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
    cur = con.execute(sql, params or [])
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def columns(con: duckdb.DuckDBPyConnection, schema: str, table: str) -> set[str]:
    """Column names of schema.table in the snapshot (empty when the table is absent)."""
    return {
        r[0]
        for r in con.execute(
            "select column_name from duckdb_columns() where schema_name = ? and table_name = ?",
            [schema, table],
        ).fetchall()
    }


def parameter(con: duckdb.DuckDBPyConnection, name: str, default: Any) -> Any:
    """A value from seeds.parameters (numeric first, then text), or the default."""
    if not columns(con, "seeds", "parameters"):
        return default
    r = con.execute(
        "select value_double, value_text from seeds.parameters where name = ?", [name]
    ).fetchone()
    if r is None:
        return default
    return r[0] if r[0] is not None else (r[1] if r[1] is not None else default)


def clinics(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Clinics present in the snapshot (for dynamic partitions)."""
    if columns(con, "core", "sessions"):
        return [r[0] for r in con.execute(
            "select distinct clinic_id from core.sessions where clinic_id is not null order by 1"
        ).fetchall()]
    if columns(con, "raw", "events"):
        return [r[0] for r in con.execute(
            "select distinct clinic_id from raw.events where clinic_id is not null order by 1"
        ).fetchall()]
    return []


# Bins of SRS totals with the cutoff as a boundary, so that "below the cutoff" is a sum of bins.
def srs_bin_edges(cutoff: float) -> list[float]:
    """Bin edges for SRS totals (0-40) that put the concern cutoff on a bin boundary."""
    edges = [0.0, cutoff - 16, cutoff - 10, cutoff - 6, cutoff - 3, cutoff, cutoff + 2, 40.0001]
    return sorted({min(max(e, 0.0), 40.0001) for e in edges})


def early_alliance_edges(cutoff: float) -> list[float]:
    """Early-alliance (mean of first SRS totals) bins: well below, below, just above, high."""
    return [0.0, cutoff - 6, cutoff, cutoff + 2, 40.0001]


JT_CATEGORIES = ["recovered", "improved", "unchanged", "deteriorated", "harmed"]


def _check_state(
    con: duckdb.DuckDBPyConnection, select: str, asset_col: str, name_col: str, time_col: str,
    before: dt.date | None,
) -> dict[str, Any] | None:
    """Latest evaluation of every check (evaluated before `before` when given); None if none."""
    where = f"where {time_col} < ?" if before is not None else ""
    rows = _rows(con, f"""
        with ranked as (
            select {select},
                   row_number() over (partition by {asset_col}, "{name_col}"
                                      order by {time_col} desc) as rn
            from quality.check_results {where}
        )
        select * exclude (rn) from ranked where rn = 1 order by asset, check_name
    """, [before] if before is not None else [])
    if not rows:
        return None
    return {
        "checks": len(rows),
        "evaluated_to": max(r["evaluated_at"] for r in rows),
        "failing": [r for r in rows if not r["passed"]],
    }


def extract(
    con: duckdb.DuckDBPyConnection, clinic: str, period: Period
) -> RawReport:
    """All unsuppressed figures for the clinic and month, read from the open snapshot."""
    rep = RawReport(clinic=clinic, period=period)
    m0, m1, w0 = period.month, period.month_end, period.window_start
    if columns(con, "raw", "events"):
        r = con.execute("select max(recorded_at) from raw.events").fetchone()
        rep.data_as_of = r[0].strftime("%Y-%m-%d %H:%M %Z").strip() if r and r[0] else None
    rep.srs_cutoff = float(parameter(con, "srs_alliance_concern_cutoff", 36.0))
    rep.srs_operator = str(parameter(con, "srs_alliance_concern_operator", "<"))
    if {"alliance_concern_cutoff", "alliance_concern_operator"} <= columns(con, "seeds", "instruments"):
        r = con.execute("select alliance_concern_cutoff, alliance_concern_operator from seeds.instruments "
                        "where instrument = 'SRS' order by instrument_version desc limit 1").fetchone()
        if r and r[0] is not None:
            rep.srs_cutoff, rep.srs_operator = float(r[0]), str(r[1] or "<")
    rep.outcome_instrument = str(parameter(con, "assoc_outcome_instrument", "PHQ-9"))
    # The mart's own flag, so the report's % concern is the mart's number.
    concern_sql = "coalesce(srs_concern, false)"

    if columns(con, "core", "sessions"):
        a = _rows(con, """
            with s as (select * from core.sessions where clinic_id = ? and session_month = ?),
            q as (
                select session_id,
                       bool_or(construct = 'alliance') as has_alliance,
                       bool_or(construct = 'outcome') as has_outcome
                from core.questionnaire_scores where clinic_id = ? group by session_id
            )
            select
                count(distinct s.patient_id) filter (where s.status = 'attended') as active_patients,
                count(distinct s.patient_id) filter (where s.status <> 'scheduled') as booked_patients,
                count(*) filter (where s.status = 'attended') as sessions,
                count(*) filter (where s.status in ('attended', 'no_show', 'cancelled')) as appointments,
                count(*) filter (where s.status = 'attended' and q.has_alliance) as with_alliance,
                count(*) filter (where s.status = 'attended' and q.has_outcome) as with_outcome,
                -- patients behind each numerator and its complement (protect_numerators)
                count(distinct s.patient_id) filter (where s.status = 'attended' and q.has_alliance)
                    as patients_with_alliance,
                count(distinct s.patient_id) filter (
                    where s.status = 'attended' and not coalesce(q.has_alliance, false))
                    as patients_without_alliance,
                count(distinct s.patient_id) filter (where s.status = 'attended' and q.has_outcome)
                    as patients_with_outcome,
                count(distinct s.patient_id) filter (
                    where s.status = 'attended' and not coalesce(q.has_outcome, false))
                    as patients_without_outcome
            from s left join q using (session_id)
        """, [clinic, m0, clinic])[0]
        if not a["active_patients"]:
            # For the report's notice: the clinic's latest month with an attended session, up to
            # this one (None: none yet).
            a["last_active_month"] = con.execute(
                "select max(session_month) from core.sessions where clinic_id = ? "
                "and status = 'attended' and session_month <= ?", [clinic, m0]).fetchone()[0]
        rep.activity = a

    cm = columns(con, "marts", "clinic_monthly")
    if cm and rep.activity is not None:
        # The headline figures are the mart's own numbers for the clinic and month.
        r = _rows(con, """
            select patients, sessions_attended, mean_alliance, srs_concern_rate,
                   alliance_completeness, outcome_completeness
            from marts.clinic_monthly where scope = 'clinic' and clinic_id = ? and month = ?
        """, [clinic, m0])
        if r:
            rep.activity["active_patients"] = r[0]["patients"]
            rep.activity["sessions"] = r[0]["sessions_attended"]
            rep.activity["alliance_completeness"] = r[0]["alliance_completeness"]
            rep.activity["outcome_completeness"] = r[0]["outcome_completeness"]

    fas = columns(con, "marts", "fct_alliance_sessions")
    if fas:
        rep.trend = _rows(con, """
            select session_month as month, avg(srs_total) as mean_srs,
                   count(distinct patient_id) as patients, count(*) as sessions
            from marts.fct_alliance_sessions
            where clinic_id = ? and srs_total is not null and session_month between ? and ?
            group by 1 order by 1
        """, [clinic, w0, m0])
        edges = srs_bin_edges(rep.srs_cutoff)
        month_rows = _rows(con, f"""
            select patient_id, srs_total, {concern_sql} as concern
            from marts.fct_alliance_sessions
            where clinic_id = ? and srs_total is not null and session_month = ?
        """, [clinic, m0])
        spans = list(zip(edges[:-1], edges[1:], strict=True))
        below = [hi <= rep.srs_cutoff for _, hi in spans]

        def bin_of(row: dict[str, Any]) -> int:
            # By score, then on the side of the cutoff the mart's own flag says: with the
            # operator `<=` a score equal to the cutoff is a concern, so it belongs to the last
            # band below the cutoff (the concern bars must add up to the concern count).
            i = next(j for j, (lo, hi) in enumerate(spans) if lo <= row["srs_total"] < hi)
            if row["concern"] and not below[i] and any(below):
                i = max(j for j, b in enumerate(below) if b)
            elif not row["concern"] and below[i] and not all(below):
                i = min(j for j, b in enumerate(below) if not b)
            return i

        members: list[list[dict[str, Any]]] = [[] for _ in spans]
        for r in month_rows:
            members[bin_of(r)].append(r)
        rep.srs_bins = [{
            "lo": lo, "hi": min(hi, 40.0), "sessions": len(inside),
            "patients": len({r["patient_id"] for r in inside}), "below_cutoff": low,
        } for (lo, hi), inside, low in zip(spans, members, below, strict=True)]
        rup = _rows(con, f"""
            select
                count(*) as srs_sessions,
                count(distinct patient_id) as srs_patients,
                count(*) filter (where {concern_sql}) as concern_sessions,
                count(distinct patient_id) filter (where {concern_sql}) as concern_patients,
                count(distinct patient_id) filter (where not {concern_sql}) as no_concern_patients,
                avg(srs_total) as mean_srs
            from marts.fct_alliance_sessions
            where clinic_id = ? and srs_total is not null and session_month = ?
        """, [clinic, m0])[0]
        if {"is_candidate_rupture", "is_repaired"} <= fas:
            rup.update(_rows(con, """
                select count(*) filter (where is_candidate_rupture) as ruptures,
                       count(distinct patient_id) filter (where is_candidate_rupture) as rupture_patients,
                       count(*) filter (where is_candidate_rupture and is_repaired) as repaired,
                       -- (the repair rate's base: ruptures whose outcome is known; one still
                       -- pending in the snapshot's data is not yet unrepaired)
                       count(*) filter (where is_candidate_rupture and is_repaired is not null)
                           as ruptures_decided,
                       count(distinct patient_id) filter (
                           where is_candidate_rupture and is_repaired is not null) as decided_patients
                from marts.fct_alliance_sessions
                where clinic_id = ? and session_month between ? and ?
            """, [clinic, w0, m0])[0])
        rep.alliance = rup

    feo = columns(con, "marts", "fct_episode_outcomes")
    if feo:
        every = """from marts.fct_episode_outcomes
            where clinic_id = ? and is_closed and closed_at >= ? and closed_at < ?"""
        # Patient counts (JT categories, pre-post, early-alliance bands) take each patient's
        # latest episode closed in the window once: counting distinct patients per category
        # counted a patient with two episodes in two categories twice, so the "total" was
        # neither patients nor episodes. NHS Talking Therapies counts episodes (referrals).
        closed = f"""from (select * {every} qualify row_number() over (
                partition by patient_id, instrument order by closed_at desc, episode_id desc) = 1)
            where true"""
        args = [clinic, w0, m1]
        jt = _rows(con, f"""
            select instrument, jt_category as category, count(distinct patient_id) as patients
            {closed} and jt_category is not null group by 1, 2 order by 1, 2
        """, args)
        by_inst: dict[str, dict[str, int]] = {}
        for r in jt:
            by_inst.setdefault(r["instrument"], dict.fromkeys(JT_CATEGORIES, 0))[r["category"]] = r["patients"]
        rep.jt = [{"instrument": k, "counts": v} for k, v in sorted(by_inst.items())]
        rep.pre_post = _rows(con, f"""
            select instrument, avg(first_total) as pre, avg(last_total) as post,
                   count(distinct patient_id) as patients
            {closed} and first_total is not null and last_total is not null and is_paired
            group by 1 order by 1
        """, args)
        if {"nhstt_eligible", "nhstt_case_at_start", "nhstt_recovered",
                "nhstt_reliable_improvement", "nhstt_reliable_deterioration"} <= feo:
            rep.nhstt = _rows(con, f"""
                select
                    count(distinct episode_id) filter (where nhstt_eligible) as eligible,
                    count(distinct episode_id) filter (where nhstt_eligible and nhstt_case_at_start) as cases,
                    count(distinct episode_id) filter (where nhstt_eligible and nhstt_case_at_start and nhstt_recovered) as recovered,
                    count(distinct episode_id) filter (where nhstt_eligible and nhstt_reliable_improvement) as improved,
                    count(distinct episode_id) filter (where nhstt_eligible and nhstt_reliable_deterioration) as deteriorated
                {every} and instrument = 'PHQ-9'
            """, args)[0]
        if {"early_alliance", "reliably_improved"} <= feo:
            edges = early_alliance_edges(rep.srs_cutoff)
            rows = _rows(con, f"""
                select patient_id, early_alliance, reliably_improved as reliable_improvement, change
                {closed} and early_alliance is not null and reliably_improved is not null
                    and instrument = ?
            """, [*args, rep.outcome_instrument])
            bins = []
            for lo, hi in zip(edges[:-1], edges[1:], strict=True):
                inside = [r for r in rows if lo <= r["early_alliance"] < hi]
                bins.append({
                    "lo": lo, "hi": min(hi, 40.0),
                    "patients": len({r["patient_id"] for r in inside}),
                    "improved": len({r["patient_id"] for r in inside if r["reliable_improvement"]}),
                })
            rep.early_bins = bins

    fsg = columns(con, "marts", "fct_sudden_gains")
    if fsg and feo:
        # Episodes the criteria can judge: the sudden-gain instrument (parameter sg_instrument)
        # with at least 4 scores (two each side of a gain, the fewest the third criterion
        # takes); every closed episode of any instrument was counted before.
        judged = ("and instrument = ? and n_scores >= 4" if {"instrument", "n_scores"} <= feo
                  else "")
        judged_args = [str(parameter(con, "sg_instrument", "PHQ-9"))] if judged else []
        rep.sudden = _rows(con, f"""
            with ep as (
                select distinct episode_id, patient_id from marts.fct_episode_outcomes
                where clinic_id = ? and is_closed and closed_at >= ? and closed_at < ? {judged}
            ),
            sg as (select * from marts.fct_sudden_gains where clinic_id = ?)
            select
                (select count(distinct patient_id) from ep) as patients,
                count(distinct sg.patient_id) filter (where sg.sg_type = 'gain') as with_gain,
                count(distinct sg.patient_id) filter (where sg.sg_type = 'loss') as with_loss
            from ep left join sg using (episode_id)
        """, [clinic, w0, m1, *judged_args, clinic])[0]

    aoa = columns(con, "marts", "alliance_outcome_association")
    if aoa:
        if {"scope", "part"} <= aoa:
            # n_effective is the sample size behind the CI (therapists for the between part,
            # patients - therapists + 1 within); it is what the report shows and suppresses on.
            n_eff = "n_effective" if "n_effective" in aoa else "n"
            n_th = "n_therapists" if "n_therapists" in aoa else "null"
            rep.association = _rows(con, f"""
                select scope || ': ' || replace(part, '_', '-') as scope, part, r, ci_low, ci_high,
                       n as n_patients, {n_eff} as n_effective, {n_th} as n_therapists
                from marts.alliance_outcome_association
                where (scope = 'clinic' and clinic_id = ?) or (scope = 'network' and part = 'overall')
                order by alliance_outcome_association.scope,
                    case alliance_outcome_association.part when 'overall' then 0
                        when 'within_therapist' then 1 else 2 end
            """, [clinic])
        else:
            rep.association = _rows(con, "select * from marts.alliance_outcome_association "
                                         "where clinic_id = ?", [clinic])

    need_fas = {"therapist_id", "patient_id", "session_month", "alliance_total"}
    need_feo = {"therapist_id", "instrument", "is_closed", "closed_at", "is_paired",
                "reliably_improved", "improvement_vs_expected", "network_intake_sd"}
    if need_fas <= fas and need_feo <= feo:
        # The therapist table covers the trailing window ending with the report month, as its
        # header says: sessions in the window, closed episodes of the outcome instrument closed in
        # it. Same definitions as marts.therapist_summary (which covers all time).
        rep.therapists = _rows(con, """
            with s as (
                select therapist_id, count(distinct patient_id) as patients, count(*) as sessions,
                       avg(alliance_total) as mean_alliance
                from marts.fct_alliance_sessions
                where clinic_id = ? and therapist_id is not null
                    and session_month >= ? and session_month < ?
                group by 1
            ),
            o as (
                select therapist_id,
                       count(*) filter (where is_paired) as outcome_patients,
                       100.0 * avg(case when reliably_improved then 1.0 else 0.0 end)
                           filter (where is_paired) as pct_reliable_improvement,
                       avg(improvement_vs_expected) / any_value(network_intake_sd)
                           as severity_adjusted_es
                from marts.fct_episode_outcomes
                where clinic_id = ? and instrument = ? and is_closed and therapist_id is not null
                    and closed_at >= ? and closed_at < ?
                group by 1
            )
            select therapist_id, coalesce(s.patients, 0) as patients,
                   coalesce(s.sessions, 0) as sessions, s.mean_alliance,
                   o.pct_reliable_improvement, coalesce(o.outcome_patients, 0) as outcome_patients,
                   o.severity_adjusted_es
            from s full outer join o using (therapist_id)
            order by therapist_id
        """, [clinic, w0, m1, clinic, rep.outcome_instrument, w0, m1])
    elif columns(con, "marts", "therapist_summary"):
        # An older snapshot without the fct_ columns: the mart's all-time figures, labelled so.
        rep.therapists_windowed = False
        rep.therapists = _rows(con, """
            select therapist_id, patients, sessions_attended as sessions, mean_alliance,
                   100.0 * reliable_improvement_rate as pct_reliable_improvement,
                   episodes_paired as outcome_patients,
                   severity_adjusted_effect_size as severity_adjusted_es
            from marts.therapist_summary where clinic_id = ? order by therapist_id
        """, [clinic])

    qc = columns(con, "raw", "quarantine")
    if qc:
        # A quarantined line belongs to the month its event took place (occurred_at in the
        # redacted envelope, in UTC months as core.sessions.session_month), not the month it was
        # processed: a report made later for an earlier month must still find it. Lines without a
        # readable occurred_at are dated by when they were received (recorded_at), and counted.
        q = _rows(con, """
            with lines as (
                select json_extract_string(line_redacted, '$.clinic_id') as clinic_id,
                       reason_code,
                       try_cast(json_extract_string(line_redacted, '$.occurred_at') as timestamptz)
                           as occurred_at,
                       recorded_at
                from raw.quarantine
            )
            select clinic_id, reason_code, count(*) as records,
                   count(*) filter (where occurred_at is null) as by_received
            from lines
            where cast(date_trunc('month', coalesce(occurred_at, recorded_at) at time zone 'UTC')
                       as date) = ?
            group by all
        """, [m0])
        mine = [r for r in q if r["clinic_id"] == clinic]
        rep.quarantine = sorted(
            ({"reason_code": r["reason_code"], "records": r["records"],
              "by_received": r["by_received"]} for r in mine),
            key=lambda r: (-r["records"], r["reason_code"]),
        )
        rep.quarantine_by_received = sum(r["by_received"] for r in mine)
        rep.quarantine_unattributed = sum(r["records"] for r in q if r["clinic_id"] is None)

    cr = columns(con, "quality", "check_results")
    if cr:
        name_col = "check_name" if "check_name" in cr else ("check" if "check" in cr else None)
        time_col = next((c for c in ("evaluated_at", "checked_at", "recorded_at", "time") if c in cr), None)
        if name_col and "passed" in cr and time_col:
            rep.check_history = True
            asset_col = "asset_key" if "asset_key" in cr else ("asset" if "asset" in cr else "''")
            sev = "severity" if "severity" in cr else "''"
            unexp = "unexpected_count" if "unexpected_count" in cr else "null"
            select = (f'{asset_col} as asset, "{name_col}" as check_name, passed, {sev} as severity, '
                      f"{unexp} as unexpected_count, {time_col} as evaluated_at")
            # Checks are evaluated when the pipeline runs, not per month: the state that covers
            # this month's data is the latest one (as of the snapshot); the state at the end of
            # the period is shown too, and said to be absent when nothing was evaluated by then.
            rep.checks_latest = _check_state(con, select, asset_col, name_col, time_col, None)
            rep.checks_period_end = _check_state(con, select, asset_col, name_col, time_col, m1)

    if columns(con, "seeds", "instruments"):
        rep.instruments = _rows(con, "select * from seeds.instruments order by all")
    if columns(con, "seeds", "parameters"):
        rep.parameters = _rows(con, "select name, value_double, value_text, doc, source "
                                    "from seeds.parameters order by name")
    return rep
