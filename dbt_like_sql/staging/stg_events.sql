-- Every accepted event the platform knew at the as-of time.
-- `SET VARIABLE as_of = '2026-03-01T00:00:00Z'` before querying or building reproduces the past;
-- unset, every event counts. All other staging models read this view, so they inherit the filter.
with

events as (select * from raw.events),

known_as_of as (
    select
        event_id,
        content_hash,
        event_type,
        schema_version,
        occurred_at,
        recorded_at,
        source,
        clinic_id,
        patient_id,
        therapist_id,
        episode_id,
        session_id,
        payload,
        file_id,
        line_number
    from events
    where recorded_at <= coalesce(getvariable('as_of')::timestamptz, 'infinity'::timestamptz)
)

select * from known_as_of
