-- One row per booked session; a re-booking is a new session.scheduled event for the same
-- session_id, so the latest occurred_at (then recorded_at) wins.
with

events as (select * from staging.stg_events where event_type = 'session.scheduled'),

renamed as (
    select
        event_id,
        session_id,
        episode_id,
        patient_id,
        therapist_id,
        clinic_id,
        occurred_at as booked_at,
        (payload->>'scheduled_for')::timestamptz as scheduled_for,
        payload->>'modality' as modality,
        recorded_at
    from events
),

latest_per_session as (
    select
        *,
        count(*) over (partition by session_id) as event_count
    from renamed
    qualify row_number() over (
        partition by session_id order by booked_at desc, recorded_at desc, event_id desc
    ) = 1
)

select * from latest_per_session
