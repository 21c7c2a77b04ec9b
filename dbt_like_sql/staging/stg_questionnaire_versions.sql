-- Every questionnaire version the platform knew at the as-of time: each submission and each
-- amendment, tied to its response. response_id is the event_id of the original submission,
-- found by following amends_event_id back through chains of amendments.
-- A chain that reaches no known submission (its submission never arrived: a FHIR bulk export
-- holds only the current, amended version of a QuestionnaireResponse) stands as its own response:
-- response_id is the amends_event_id at the root of the chain, i.e. the id of the missing
-- submission, so a submission arriving later joins the same response as version 1 and the result
-- equals in-order arrival. is_orphan flags such versions while no submission is known.
-- Only amendments in a loop (no root at all) keep response_id NULL.
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

-- roots of orphan chains: amendments of an event the platform does not know (yet)
orphan_roots as (
    select
        amendment.event_id,
        amendment.amends_event_id as response_id
    from questionnaire_events as amendment
    anti join questionnaire_events as known on amendment.amends_event_id = known.event_id
    where amendment.event_type = 'questionnaire.amended'
        and amendment.amends_event_id is not null
),

-- walk each chain from its submission, or from its missing submission (an orphan root is an
-- amendment of it: depth 1, as if the submission were there); the depth cap guards against
-- malformed loops
chains as (
    select
        event_id,
        event_id as response_id,
        0 as depth,
        false as from_orphan_root
    from questionnaire_events
    where event_type = 'questionnaire.submitted'
    union all
    select
        event_id,
        response_id,
        1 as depth,
        true as from_orphan_root
    from orphan_roots
    union all
    select
        amendment.event_id,
        chains.response_id,
        chains.depth + 1 as depth,
        chains.from_orphan_root
    from questionnaire_events as amendment
    inner join chains on amendment.amends_event_id = chains.event_id
    where amendment.event_type = 'questionnaire.amended' and chains.depth < 1000
),

versions as (
    select
        chains.response_id,
        questionnaire_events.*,
        chains.depth as amendment_depth,
        -- no known submission: the chain starts at an orphan root, or it is a loop (no chain)
        coalesce(chains.from_orphan_root, true) as is_orphan
    from questionnaire_events
    left join chains using (event_id)
),

-- order within a response: occurred_at, then depth (a correction follows what it corrects even
-- when the source gives both the same time: FHIR keeps `authored` on an amended response), then
-- recorded_at. Depth before recorded_at makes a late submission sort first, as in-order arrival.
numbered as (
    select
        *,
        row_number() over (
            partition by response_id
            order by occurred_at, amendment_depth, recorded_at, event_id
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
