-- Every questionnaire retraction the platform knew at the as-of time.
with

-- as-of filtered in one place: staging.stg_events
events as (select * from staging.stg_events where event_type = 'questionnaire.retracted'),

retractions as (
    select
        event_id as retraction_event_id,
        payload ->> 'retracts_event_id' as retracts_event_id,
        payload ->> 'reason' as reason,
        occurred_at,
        recorded_at,
        source,
        clinic_id,
        patient_id
    from events
)

select * from retractions
