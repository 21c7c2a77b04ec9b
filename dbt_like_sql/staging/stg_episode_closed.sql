-- One row per closed episode; when closings conflict the latest occurred_at wins (a corrected
-- end reason is sent as a new episode.closed event).
with

events as (select * from staging.stg_events where event_type = 'episode.closed'),

renamed as (
    select
        event_id,
        episode_id,
        patient_id,
        clinic_id,
        occurred_at as closed_at,
        payload->>'reason' as end_reason,
        recorded_at
    from events
),

latest_per_episode as (
    select
        *,
        count(*) over (partition by episode_id) as event_count
    from renamed
    qualify row_number() over (
        partition by episode_id order by closed_at desc, recorded_at desc, event_id desc
    ) = 1
)

select * from latest_per_episode
