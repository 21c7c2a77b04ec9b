-- Every accepted event the platform knew at the as-of time.
-- `SET VARIABLE as_of = '2026-03-01T00:00:00Z'` before querying or building reproduces the past;
-- unset, every event counts. All other staging models read this view, so they inherit the filter.
-- Events of files rejected after a blocking check failed (raw.rejected_files) are left out.
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
        -- files a data engineer rejected (alliance reject-file) leave from the rejection on
        and file_id not in (
            select file_id from raw.rejected_files
            where rejected_at <= coalesce(getvariable('as_of')::timestamptz, 'infinity'::timestamptz)
        )
)

select * from known_as_of
