-- Every questionnaire retraction the platform knew at the as-of time.
with

events as (
    select *
    from raw.events
    where recorded_at <= coalesce(getvariable('as_of')::timestamptz, 'infinity'::timestamptz)
),

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
    where event_type = 'questionnaire.retracted'
)

select * from retractions
