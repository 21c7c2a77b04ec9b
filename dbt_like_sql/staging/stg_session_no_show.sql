-- One row per session the patient missed without cancelling (latest event wins when re-sent).
with

events as (select * from staging.stg_events where event_type = 'session.no_show'),

renamed as (
    select
        event_id,
        session_id,
        episode_id,
        patient_id,
        therapist_id,
        clinic_id,
        occurred_at as no_show_at,
        recorded_at
    from events
),

latest_per_session as (
    select
        *,
        count(*) over (partition by session_id) as event_count
    from renamed
    qualify row_number() over (
        partition by session_id order by no_show_at desc, recorded_at desc, event_id desc
    ) = 1
)

select * from latest_per_session
