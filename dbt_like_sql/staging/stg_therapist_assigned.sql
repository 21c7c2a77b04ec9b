-- Every therapist assignment (the history; core.episodes picks the latest primary one).
with

events as (select * from staging.stg_events where event_type = 'therapist.assigned'),

renamed as (
    select
        event_id,
        episode_id,
        patient_id,
        therapist_id,
        clinic_id,
        occurred_at as assigned_at,
        coalesce(payload->>'role', 'primary') as role,
        recorded_at
    from events
)

select * from renamed
