-- One row per cancelled session (latest session.cancelled event wins when re-sent).
with

events as (select * from staging.stg_events where event_type = 'session.cancelled'),

renamed as (
    select
        event_id,
        session_id,
        episode_id,
        patient_id,
        therapist_id,
        clinic_id,
        occurred_at as cancelled_at,
        payload->>'cancelled_by' as cancelled_by,
        (payload->>'late')::boolean as is_late,
        recorded_at
    from events
),

latest_per_session as (
    select
        *,
        count(*) over (partition by session_id) as event_count
    from renamed
    qualify row_number() over (
        partition by session_id order by cancelled_at desc, recorded_at desc, event_id desc
    ) = 1
)

select * from latest_per_session
