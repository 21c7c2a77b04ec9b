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


# The events staging keeps: recorded as of the as-of time, and not in a file rejected by then
# (alliance reject-file), as in staging.stg_events.
_AS_OF_TIME = "coalesce(getvariable('as_of')::timestamptz, 'infinity'::timestamptz)"
AS_OF = (f"recorded_at <= {_AS_OF_TIME} and file_id not in (select file_id from raw.rejected_files "
         f"where rejected_at <= {_AS_OF_TIME})")

# Per-type staging views, the event types each holds, and how it accounts for them:
# 'collapsing' views keep the latest event per session or episode and carry `event_count` (the
# events of that key), so the events they fold away are sum(event_count) - rows; 'per_event'
# views keep one row per event.
STAGED_TYPES: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("stg_episode_opened", ("episode.opened",), "collapsing"),
    ("stg_episode_closed", ("episode.closed",), "collapsing"),
    ("stg_session_scheduled", ("session.scheduled",), "collapsing"),
    ("stg_session_attended", ("session.attended",), "collapsing"),
    ("stg_session_cancelled", ("session.cancelled",), "collapsing"),
    ("stg_session_no_show", ("session.no_show",), "collapsing"),
    ("stg_therapist_assigned", ("therapist.assigned",), "per_event"),
    ("stg_questionnaire_versions", ("questionnaire.submitted", "questionnaire.amended"), "per_event"),
    ("stg_questionnaire_retractions", ("questionnaire.retracted",), "per_event"),
)
_COLUMNS = "event_type, staging_model, raw_events, staged_rows, collapsed, unaccounted"


def _in_list(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _view_sql(view: str, types: tuple[str, ...], how: str) -> str:
    """Raw events of the view's types (as of, read from raw.events: independent of stg_events)
    against the view's rows plus the re-sent events it collapsed."""
    accounted = "coalesce(sum(event_count), 0)" if how == "collapsing" else "count(*)"
    return f"""
        select
            kinds.event_type,
            '{view}' as staging_model,
            coalesce(raw_counts.n, 0) as raw_events,
            coalesce(staged.staged_rows, 0) as staged_rows,
            coalesce(staged.accounted, 0) - coalesce(staged.staged_rows, 0) as collapsed,
            coalesce(raw_counts.n, 0) - coalesce(staged.accounted, 0) as unaccounted
        from (select unnest([{_in_list(types)}]) as event_type) as kinds
        left join (
            select event_type, count(*) as n from raw.events
            where {AS_OF} and event_type in ({_in_list(types)})
            group by event_type
        ) as raw_counts using (event_type)
        left join (
            select {"'" + types[0] + "' as event_type" if len(types) == 1 else "event_type"},
                   count(*) as staged_rows, {accounted} as accounted
            from staging.{view}
            group by all
        ) as staged using (event_type)
    """


# Event types in the log with no staging view: every one of their events is unaccounted for.
_UNSTAGED_SQL = f"""
    select event_type, '(no staging view)' as staging_model, count(*) as raw_events,
           0 as staged_rows, 0 as collapsed, count(*) as unaccounted
    from raw.events
    where {AS_OF}
        and event_type not in ({_in_list(tuple(t for _, ts, _ in STAGED_TYPES for t in ts))})
    group by event_type
"""

# Response chains of questionnaire versions = current responses + withdrawn chains (the
# response's id retracted: its submission, or the missing submission of an orphan chain; or every
# version retracted). Orphan chains count (stg_questionnaire_versions); only amendment loops, which
# have no response_id, are left out.
_RESPONSES_SQL = """
    with

    retracted as (
        select distinct retracts_event_id as event_id
        from staging.stg_questionnaire_retractions
        where retracts_event_id is not null
    ),

    chains as (
        select
            v.response_id,
            v.response_id in (select event_id from retracted)
                or bool_and(r.event_id is not null) as is_withdrawn
        from staging.stg_questionnaire_versions as v
        left join retracted as r using (event_id)
        where v.response_id is not null
        group by v.response_id
    ),

    counts as (
        select
            (select count(*) from chains) as chains,
            (select count(*) from staging.stg_questionnaire_responses) as staged_rows,
            (select count(*) from chains where is_withdrawn) as withdrawn
    )

    select 'questionnaire.responses' as event_type,
           'stg_questionnaire_responses' as staging_model, chains as raw_events, staged_rows,
           withdrawn as collapsed, chains - staged_rows - withdrawn as unaccounted
    from counts
"""

# The whole table (what conservation_report returns); each check below evaluates one part.
CONSERVATION_SQL = "\nunion all\n".join(
    f"select {_COLUMNS} from ({sql})"
    for sql in [*(_view_sql(*v) for v in STAGED_TYPES), _UNSTAGED_SQL, _RESPONSES_SQL]
)


def conservation_report(con: duckdb.DuckDBPyConnection) -> list[dict[str, object]]:
    """Per event type: raw events (as of), staged rows, collapsed re-sends, unaccounted."""
    cur = con.execute(f"select * from ({CONSERVATION_SQL}) order by event_type")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _failing(sql: str) -> str:
    return f"""
        select event_type as failing_key, abs(unaccounted) as n
        from ({sql})
        where unaccounted <> 0
    """


_CONSERVED = (
    "Row conservation from the event log: raw.events of {what} known at the as-of time "
    "(read with its own as-of filter) = rows of {view} + the re-sent events it collapsed "
    "(latest per session or episode). Failing keys are event types; the count is the number "
    "of events unaccounted for."
)

# One conservation check per staging view, on that view: a blocking failure stops exactly the
# models built on the broken view, and the check waits only for assets upstream of it (a check
# on stg_events waiting for the views built on stg_events would be a cycle).
CONSERVATION_CHECKS: tuple[RelationalCheck, ...] = (
    *(RelationalCheck(
        name="events_conserved",
        asset=("staging", view),
        severity="ERROR",
        description=_CONSERVED.format(what=" and ".join(types), view=f"staging.{view}"),
        failing_sql=_failing(_view_sql(view, types, how)),
        requires=("raw.events", f"staging.{view}"),
    ) for view, types, how in STAGED_TYPES),
    RelationalCheck(
        name="events_conserved",
        asset=("staging", "stg_events"),
        severity="ERROR",
        description="Every event type in raw.events (as of) has a per-type staging view; events "
        "of a type no view reads would vanish from every model. Failing keys are event types.",
        failing_sql=_failing(_UNSTAGED_SQL),
        requires=("raw.events", "staging.stg_events"),
    ),
    RelationalCheck(
        name="responses_conserved",
        asset=("staging", "stg_questionnaire_responses"),
        severity="ERROR",
        description="Questionnaire response chains (orphan chains included) = current responses in "
        "staging.stg_questionnaire_responses + chains withdrawn by a retraction.",
        failing_sql=_failing(_RESPONSES_SQL),
        requires=("staging.stg_questionnaire_versions", "staging.stg_questionnaire_retractions",
                  "staging.stg_questionnaire_responses"),
    ),
)


CHECKS: tuple[RelationalCheck, ...] = (
    *CONSERVATION_CHECKS,
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
