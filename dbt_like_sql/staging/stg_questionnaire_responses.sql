-- The current version of every questionnaire response that still counts.
-- A retraction of the original submission retracts the whole response (amendments included);
-- a retraction of one amendment withdraws only that version, so the response falls back to the
-- latest remaining version. Latest = by occurred_at, then amendment depth (a correction with the
-- same time as what it corrects wins), then recorded_at, then event_id: the order does not
-- depend on arrival, so a submission that arrives after its amendment does not displace it.
-- Orphan responses (amendments whose submission never arrived, is_orphan) count like any other:
-- their response_id is the missing submission's id, so a retraction naming that id retracts them.
-- Only versions in an amendment loop (response_id NULL) are left out.
with

versions as (
    select * from staging.stg_questionnaire_versions where response_id is not null
),
retractions as (select * from staging.stg_questionnaire_retractions),

retracted_events as (
    select distinct retracts_event_id as event_id
    from retractions
    where retracts_event_id is not null
),

-- response_id is the (possibly missing) submission's event_id
retracted_responses as (
    select event_id as response_id from retracted_events
),

chain_stats as (
    select
        versions.response_id,
        count(*) as version_count,
        count(retracted_events.event_id) as retracted_version_count,
        bool_or(versions.is_orphan) as is_orphan
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
        partition by response_id
        order by occurred_at desc, amendment_depth desc, recorded_at desc, event_id desc
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
    latest.event_type = 'questionnaire.amended' as is_amended,
    chain_stats.is_orphan
from latest
inner join chain_stats using (response_id)
