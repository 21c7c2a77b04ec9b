-- Every questionnaire version the platform knew at the as-of time: each submission and each
-- amendment, tied to its response. response_id is the event_id of the original submission,
-- found by following amends_event_id back through chains of amendments. Amendments whose chain
-- reaches no known submission keep response_id NULL (is_orphan) so nothing silently vanishes.
with recursive

-- as-of filtered in one place: staging.stg_events
events as (
    select * from staging.stg_events
    where event_type in ('questionnaire.submitted', 'questionnaire.amended')
),

questionnaire_events as (
    select
        event_id,
        event_type,
        occurred_at,
        recorded_at,
        source,
        clinic_id,
        patient_id,
        therapist_id,
        episode_id,
        session_id,
        payload ->> 'instrument' as instrument,
        payload ->> 'instrument_version' as instrument_version,
        payload ->> 'respondent' as respondent,
        payload ->> 'timing' as timing,
        try_cast(payload ->> 'administered_at' as timestamptz) as administered_at,
        payload -> 'answers' as answers,
        try_cast(payload ->> 'total' as double) as total_reported,
        payload ->> 'amends_event_id' as amends_event_id
    from events
    where event_type in ('questionnaire.submitted', 'questionnaire.amended')
),

-- walk each chain from its submission; the depth cap guards against malformed loops
chains as (
    select
        event_id,
        event_id as response_id,
        0 as depth
    from questionnaire_events
    where event_type = 'questionnaire.submitted'
    union all
    select
        amendment.event_id,
        chains.response_id,
        chains.depth + 1 as depth
    from questionnaire_events as amendment
    inner join chains on amendment.amends_event_id = chains.event_id
    where amendment.event_type = 'questionnaire.amended' and chains.depth < 1000
),

versions as (
    select
        chains.response_id,
        questionnaire_events.*,
        chains.depth as amendment_depth,
        chains.response_id is null as is_orphan
    from questionnaire_events
    left join chains using (event_id)
),

numbered as (
    select
        *,
        row_number() over (
            partition by response_id order by occurred_at, recorded_at, event_id
        ) as version_number
    from versions
)

select
    response_id,
    event_id,
    event_type,
    amends_event_id,
    version_number,
    amendment_depth,
    is_orphan,
    occurred_at,
    recorded_at,
    source,
    clinic_id,
    patient_id,
    therapist_id,
    episode_id,
    session_id,
    instrument,
    instrument_version,
    respondent,
    timing,
    administered_at,
    answers,
    total_reported
from numbered
