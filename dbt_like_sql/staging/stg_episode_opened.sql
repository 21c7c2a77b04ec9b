-- One row per episode that has an episode.opened event; a re-sent opening (e.g. a corrected
-- age group) supersedes the earlier one: the latest occurred_at wins, then the latest recorded_at.
with

events as (select * from staging.stg_events where event_type = 'episode.opened'),

renamed as (
    select
        event_id,
        episode_id,
        patient_id,
        clinic_id,
        occurred_at as opened_at,
        payload->>'age_group' as age_group,
        payload->>'referral_source' as referral_source,
        recorded_at
    from events
),

latest_per_episode as (
    select
        *,
        count(*) over (partition by episode_id) as event_count
    from renamed
    qualify row_number() over (
        partition by episode_id order by opened_at desc, recorded_at desc, event_id desc
    ) = 1
)

select * from latest_per_episode
