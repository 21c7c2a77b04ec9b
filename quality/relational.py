"""Relational checks in SQL: conservation and cross-table consistency GX cannot express.

Each check is one query returning (unexpected count, up to 5 failing keys); failing keys are
pseudonyms (or event types for conservation), never raw identifiers or free text.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from quality.gx_runner import MAX_FAILING_KEYS, CheckOutcome


@dataclass(frozen=True)
class RelationalCheck:
    """One SQL check: the asset it validates, its severity and the query of its failing keys."""

    name: str
    asset: tuple[str, str]
    severity: str  # 'ERROR' (blocking) | 'WARN'
    description: str
    failing_sql: str  # selects `failing_key` (and optionally `n`, the weight of that key)
    requires: tuple[str, ...]  # tables the query reads ('schema.name')


CHECKS: tuple[RelationalCheck, ...] = (
    RelationalCheck(
        name="events_conserved",
        asset=("staging", "stg_events"),
        severity="ERROR",
        description="Row conservation: staging.stg_events holds exactly the raw.events rows known "
        "at the as-of time, per event type (no event lost or doubled between log and staging).",
        failing_sql="""
            with

            raw_counts as (
                select event_type, count(*) as n
                from raw.events
                where recorded_at <= coalesce(getvariable('as_of')::timestamptz,
                                              'infinity'::timestamptz)
                group by all
            ),

            staged_counts as (
                select event_type, count(*) as n from staging.stg_events group by all
            )

            select
                coalesce(r.event_type, s.event_type) as failing_key,
                abs(coalesce(r.n, 0) - coalesce(s.n, 0)) as n
            from raw_counts as r
            full join staged_counts as s using (event_type)
            where coalesce(r.n, 0) <> coalesce(s.n, 0)
        """,
        requires=("raw.events", "staging.stg_events"),
    ),
    RelationalCheck(
        name="questionnaires_on_known_sessions",
        asset=("core", "questionnaire_scores"),
        severity="WARN",
        description="Every questionnaire that names a session refers to a session known in "
        "core.sessions (an unknown one cannot be placed in the session series).",
        failing_sql="""
            select q.session_id as failing_key, 1 as n
            from core.questionnaire_scores as q
            anti join core.sessions as s using (session_id)
            where q.session_id is not null
        """,
        requires=("core.questionnaire_scores", "core.sessions"),
    ),
    RelationalCheck(
        name="no_attended_session_after_episode_end",
        asset=("core", "sessions"),
        severity="WARN",
        description="No attended session takes place after its episode was closed.",
        failing_sql="""
            select s.session_id as failing_key, 1 as n
            from core.sessions as s
            inner join core.episodes as e using (episode_id)
            where s.status = 'attended'
                and e.closed_at is not null
                and s.session_at > e.closed_at
        """,
        requires=("core.sessions", "core.episodes"),
    ),
)


def _exists(con: duckdb.DuckDBPyConnection, fqn: str) -> bool:
    schema, name = fqn.split(".", 1)
    row = con.execute(
        "select (select count(*) from duckdb_tables() where schema_name = $1 and table_name = $2)"
        " + (select count(*) from duckdb_views() where schema_name = $1 and view_name = $2)",
        [schema, name],
    ).fetchone()
    return bool(row and row[0])


def run_check(con: duckdb.DuckDBPyConnection, check: RelationalCheck) -> CheckOutcome:
    """Evaluate one relational check; a missing input table fails it with a clear message."""
    missing = [t for t in check.requires if not _exists(con, t)]
    if missing:
        msg = f"table(s) not found: {', '.join(missing)}"
        return CheckOutcome(check.name, False, 0, [msg], [], 1, errors=[msg])
    n, keys = con.execute(
        f"""
        with failing as ({check.failing_sql})
        select
            coalesce(sum(n), 0)::bigint,
            (select list(k) from (select distinct failing_key::varchar as k from failing
                                  where failing_key is not null order by k
                                  limit {MAX_FAILING_KEYS}))
        from failing
        """
    ).fetchone()
    n = int(n or 0)
    return CheckOutcome(
        check=check.name,
        passed=n == 0,
        unexpected_count=n,
        failing_expectations=[f"{check.name}: {n} unexpected"] if n else [],
        failing_keys=list(keys or []),
        expectations_evaluated=1,
    )
