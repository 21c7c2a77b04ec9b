-- One row per episode, outcome instrument and measurement position: the score series that
-- episode outcomes and sudden gains are computed from.
-- Position = the attended session's number (1..n); 0 = an intake score not tied to a session
-- (timing 'intake', or given before the first attended session). Follow-up scores after the
-- episode are not part of the series. Two scores at one position: the latest administered wins.
with

scores as (
    select * from core.questionnaire_scores
    where construct = 'outcome' and is_scorable and episode_id is not null
),

attended_sessions as (
    select * from core.sessions where status = 'attended'
),

episodes as (select * from core.episodes),

scores_with_sessions as (
    select
        scores.*,
        attended_sessions.session_number,
        attended_sessions.session_at,
        episodes.first_session_at
    from scores
    left join attended_sessions
        on scores.session_id = attended_sessions.session_id
    left join episodes
        on scores.episode_id = episodes.episode_id
),

positioned as (
    select
        *,
        case
            when session_number is not null then session_number
            when session_id is null
                and (timing = 'intake' or first_session_at is null
                     or administered_at < first_session_at) then 0
        end as measure_position
    from scores_with_sessions
),

one_per_position as (
    select * from positioned
    where measure_position is not null
    qualify row_number() over (
        partition by episode_id, instrument, measure_position
        order by administered_at desc, response_id desc
    ) = 1
),

sequenced as (
    select
        *,
        row_number() over w as score_sequence,
        count(*) over (partition by episode_id, instrument) as scores_in_episode,
        first_value(total) over w as first_total,
        lag(total) over w as previous_total
    from one_per_position
    window w as (partition by episode_id, instrument order by measure_position)
),

final as (
    select
        ---------- ids
        response_id,
        episode_id,
        patient_id,
        therapist_id,
        clinic_id,
        session_id,
        instrument,
        instrument_version,
        ---------- when
        measure_position,
        session_number,
        score_sequence,
        scores_in_episode,
        administered_at,
        cast(date_trunc('month', coalesce(session_at, administered_at)) as date) as score_month,
        ---------- score
        total,
        severity_band,
        caseness,
        clinical_cutoff,
        reliable_change,
        higher_is_better,
        critical_item_flag,
        critical_item_missing,
        ---------- change
        total - first_total as change_from_first,
        case when higher_is_better then total - first_total else first_total - total end
            as improvement_from_first,
        total - previous_total as change_from_previous,
        case
            when reliable_change is null or score_sequence = 1 then null
            when (case when higher_is_better then total - first_total else first_total - total end)
                >= reliable_change then 'reliably_improved'
            when (case when higher_is_better then first_total - total else total - first_total end)
                >= reliable_change then 'reliably_deteriorated'
            else 'no_reliable_change'
        end as reliable_change_from_first
    from sequenced
)

select * from final
