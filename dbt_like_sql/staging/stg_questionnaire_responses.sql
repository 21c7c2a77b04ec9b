-- The current version of every questionnaire response that still counts.
-- A retraction of the original submission retracts the whole response (amendments included);
-- a retraction of one amendment withdraws only that version, so the response falls back to the
-- latest remaining version. Latest = by occurred_at, then recorded_at, then event_id.
with

versions as (select * from staging.stg_questionnaire_versions where not is_orphan),
retractions as (select * from staging.stg_questionnaire_retractions),

retracted_events as (
    select distinct retracts_event_id as event_id
    from retractions
    where retracts_event_id is not null
),

retracted_responses as (
    select distinct versions.response_id
    from versions
    inner join retracted_events using (event_id)
    where versions.event_type = 'questionnaire.submitted'
),

chain_stats as (
    select
        versions.response_id,
        count(*) as version_count,
        count(retracted_events.event_id) as retracted_version_count
    from versions
    left join retracted_events using (event_id)
    group by versions.response_id
),

valid_versions as (
    select versions.*
    from versions
    anti join retracted_events using (event_id)
    anti join retracted_responses using (response_id)
),

latest as (
    select *
    from valid_versions
    qualify row_number() over (
        partition by response_id order by occurred_at desc, recorded_at desc, event_id desc
    ) = 1
)

select
    latest.response_id,
    latest.event_id,
    latest.event_type,
    latest.occurred_at,
    latest.recorded_at,
    latest.source,
    latest.clinic_id,
    latest.patient_id,
    latest.therapist_id,
    latest.episode_id,
    latest.session_id,
    latest.instrument,
    latest.instrument_version,
    latest.respondent,
    latest.timing,
    latest.administered_at,
    latest.answers,
    latest.total_reported,
    chain_stats.version_count,
    chain_stats.retracted_version_count,
    latest.event_type = 'questionnaire.amended' as is_amended
from latest
inner join chain_stats using (response_id)
