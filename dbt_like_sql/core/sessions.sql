-- One row per session (appointment): its status, when it was, who held it, and its number in
-- the episode. Status is the latest of the attended / cancelled / no-show events by occurred_at
-- (a no-show later corrected to attended becomes attended); only booked: 'scheduled'.
with

scheduled as (select * from staging.stg_session_scheduled),
attended as (select * from staging.stg_session_attended),
cancelled as (select * from staging.stg_session_cancelled),
no_shows as (select * from staging.stg_session_no_show),
assignments as (select * from staging.stg_therapist_assigned),

status_events as (
    select session_id, episode_id, patient_id, therapist_id, clinic_id,
           'attended' as status, attended_at as status_at, recorded_at, event_id,
           modality, duration_minutes,
           null::varchar as cancelled_by, null::boolean as is_late
    from attended
    union all
    select session_id, episode_id, patient_id, therapist_id, clinic_id,
           'cancelled' as status, cancelled_at as status_at, recorded_at, event_id,
           null as modality, null as duration_minutes,
           cancelled_by, is_late
    from cancelled
    union all
    select session_id, episode_id, patient_id, therapist_id, clinic_id,
           'no_show' as status, no_show_at as status_at, recorded_at, event_id,
           null as modality, null as duration_minutes,
           null as cancelled_by, null as is_late
    from no_shows
),

latest_status as (
    select *
    from status_events
    qualify row_number() over (
        partition by session_id order by status_at desc, recorded_at desc, event_id desc
    ) = 1
),

joined as (
    -- a session may be booked without an outcome yet, or have an outcome without a booking
    select
        coalesce(latest_status.session_id, scheduled.session_id) as session_id,
        coalesce(latest_status.episode_id, scheduled.episode_id) as episode_id,
        coalesce(latest_status.patient_id, scheduled.patient_id) as patient_id,
        coalesce(latest_status.therapist_id, scheduled.therapist_id) as event_therapist_id,
        coalesce(latest_status.clinic_id, scheduled.clinic_id) as clinic_id,
        coalesce(latest_status.status, 'scheduled') as status,
        latest_status.status_at,
        scheduled.scheduled_for,
        case when latest_status.status = 'attended' then latest_status.status_at end as attended_at,
        coalesce(latest_status.modality, scheduled.modality) as modality,
        latest_status.duration_minutes,
        latest_status.cancelled_by,
        latest_status.is_late as is_late_cancellation
    from latest_status
    full outer join scheduled on latest_status.session_id = scheduled.session_id
),

timed as (
    select
        *,
        coalesce(attended_at, scheduled_for, status_at) as session_at
    from joined
),

primary_assignments as (
    select episode_id, therapist_id, assigned_at
    from assignments
    where role = 'primary'
),

first_primary as (
    select episode_id, therapist_id
    from primary_assignments
    qualify row_number() over (partition by episode_id order by assigned_at, therapist_id) = 1
),

with_assignment as (
    -- the primary therapist in charge at the session time (an asof join), when the session
    -- events themselves do not name one
    select
        timed.*,
        primary_assignments.therapist_id as assigned_therapist_id
    from timed
    asof left join primary_assignments
        on timed.episode_id = primary_assignments.episode_id
        and timed.session_at >= primary_assignments.assigned_at
),

with_therapist as (
    select
        with_assignment.*,
        coalesce(
            with_assignment.event_therapist_id,
            with_assignment.assigned_therapist_id,
            first_primary.therapist_id
        ) as therapist_id
    from with_assignment
    left join first_primary using (episode_id)
),

numbered as (
    -- both numbers share one window (one sort): session_number is the running count of
    -- attended sessions, kept only on attended rows
    select
        *,
        case
            when status = 'attended' then count(*) filter (where status = 'attended') over episode_order
        end as session_number,
        row_number() over episode_order as appointment_number
    from with_therapist
    window episode_order as (
        partition by episode_id order by session_at, session_id
        rows between unbounded preceding and current row
    )
),

final as (
    select
        session_id,
        episode_id,
        patient_id,
        therapist_id,
        clinic_id,
        status,
        session_at,
        -- months in UTC so a rebuild gives the same month whatever the machine's time zone
        cast(date_trunc('month', session_at at time zone 'UTC') as date) as session_month,
        session_number,
        appointment_number,
        modality,
        duration_minutes,
        scheduled_for,
        attended_at,
        status_at,
        cancelled_by,
        is_late_cancellation
    from numbered
)

select * from final
