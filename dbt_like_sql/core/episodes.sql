-- One row per episode of care: who, when, why it ended, its therapist and session counts.
with

opened as (select * from staging.stg_episode_opened),
closed as (select * from staging.stg_episode_closed),
assignments as (select * from staging.stg_therapist_assigned),
sessions as (select * from core.sessions),

all_episodes as (
    select episode_id from opened
    union
    select episode_id from closed
    union
    select episode_id from assignments
    union
    select episode_id from sessions where episode_id is not null
),

current_therapist as (
    -- the latest primary assignment; an episode with only secondary ones takes the latest of those
    select episode_id, therapist_id
    from assignments
    qualify row_number() over (
        partition by episode_id
        order by role = 'primary' desc, assigned_at desc, recorded_at desc, event_id desc
    ) = 1
),

session_people as (
    select episode_id, any_value(patient_id) as patient_id, any_value(clinic_id) as clinic_id
    from sessions
    group by episode_id
),

session_counts as (
    select
        episode_id,
        count(*) as sessions_total,
        count(*) filter (where status = 'scheduled') as sessions_scheduled,
        count(*) filter (where status = 'attended') as sessions_attended,
        count(*) filter (where status = 'cancelled') as sessions_cancelled,
        count(*) filter (where status = 'no_show') as sessions_no_show,
        min(session_at) filter (where status = 'attended') as first_session_at,
        max(session_at) filter (where status = 'attended') as last_session_at
    from sessions
    group by episode_id
),

joined as (
    select
        all_episodes.episode_id,
        coalesce(opened.patient_id, closed.patient_id, session_people.patient_id) as patient_id,
        coalesce(opened.clinic_id, closed.clinic_id, session_people.clinic_id) as clinic_id,
        current_therapist.therapist_id,
        opened.age_group,
        opened.referral_source,
        opened.opened_at,
        closed.closed_at,
        closed.end_reason,
        closed.closed_at is not null as is_closed,
        coalesce(session_counts.sessions_scheduled, 0) as sessions_scheduled,
        coalesce(session_counts.sessions_attended, 0) as sessions_attended,
        coalesce(session_counts.sessions_cancelled, 0) as sessions_cancelled,
        coalesce(session_counts.sessions_no_show, 0) as sessions_no_show,
        coalesce(session_counts.sessions_total, 0) as sessions_total,
        session_counts.first_session_at,
        session_counts.last_session_at
    from all_episodes
    left join opened using (episode_id)
    left join closed using (episode_id)
    left join current_therapist using (episode_id)
    left join session_people using (episode_id)
    left join session_counts using (episode_id)
)

select * from joined
