-- One row per current (latest valid, non-retracted) questionnaire response, scored by the rules
-- in seeds.instruments: one generic model for every instrument. Item-level instruments are
-- scored from core.questionnaire_item_answers (reverse keys applied there); total-only ones use
-- the reported total. Prorating happens only where the instrument allows it, and by how many
-- items is recorded. Age group for age-specific cutoffs comes from the episode's
-- episode.opened event (read from staging.stg_events, so this model does not depend on
-- core.episodes).
with

responses as (select * from staging.stg_questionnaire_responses),
item_answers as (select * from core.questionnaire_item_answers),
instruments as (select * from seeds.instruments),
bands as (select * from seeds.instrument_bands),
cutoffs as (select * from seeds.instrument_cutoffs),
events as (select * from staging.stg_events),  -- as-of filtered there, once

episode_age as (
    select
        episode_id,
        -- ties (one ingest transaction shares recorded_at) broken by event_id: deterministic
        arg_max(payload ->> 'age_group', (recorded_at, event_id)) as age_group
    from events
    where event_type = 'episode.opened' and episode_id is not null
    group by episode_id
),

session_therapist as (
    select
        session_id,
        arg_max(therapist_id, (recorded_at, event_id)) as therapist_id
    from events
    where event_type like 'session.%' and session_id is not null and therapist_id is not null
    group by session_id
),

primary_assignments as (
    select
        episode_id,
        therapist_id,
        occurred_at
    from events
    where event_type = 'therapist.assigned'
        and therapist_id is not null
        and coalesce(payload ->> 'role', 'primary') = 'primary'
),

-- the primary therapist at the time of the questionnaire, else the first one assigned
episode_therapist as (
    select
        responses.response_id,
        coalesce(
            arg_max(primary_assignments.therapist_id, primary_assignments.occurred_at)
                filter (where primary_assignments.occurred_at <= responses.administered_at),
            arg_min(primary_assignments.therapist_id, primary_assignments.occurred_at)
        ) as therapist_id
    from responses
    inner join primary_assignments using (episode_id)
    group by responses.response_id
),

item_totals as (
    select
        response_id,
        count(item_score) as items_answered,
        sum(item_score) as item_sum,
        avg(item_score) as item_mean,
        -- a risk item left unanswered is not "no risk": unknown (NULL) unless another
        -- critical item was endorsed
        case
            when bool_or(is_critical) then true
            when bool_or(is_critical_item and is_missing) then null
            else false
        end as critical_item_flag,
        bool_or(is_critical_item and is_missing) as critical_item_missing,
        string_agg(item, ',' order by item_number) filter (where is_critical) as critical_items,
        string_agg(item, ',' order by item_number) filter (where reverse_keyed)
            as reverse_keyed_items
    from item_answers
    group by response_id
),

joined as (
    select
        responses.*,
        instruments.construct,
        instruments.kind,
        instruments.scoring_rule,
        instruments.n_items,
        instruments.total_min,
        instruments.total_max,
        instruments.higher_is_better,
        instruments.prorate_max_missing,
        instruments.caseness_threshold,
        instruments.caseness_operator,
        instruments.caseness_uses_cutoff,
        instruments.clinical_if,
        instruments.reliable_change,
        instruments.alliance_concern_cutoff,
        instruments.alliance_concern_operator,
        coalesce(item_totals.items_answered, 0) as items_answered,
        item_totals.item_sum,
        item_totals.item_mean,
        item_totals.critical_item_flag,
        coalesce(item_totals.critical_item_missing, false) as critical_item_missing,
        item_totals.critical_items,
        item_totals.reverse_keyed_items,
        episode_age.age_group,
        coalesce(
            responses.therapist_id, session_therapist.therapist_id, episode_therapist.therapist_id
        ) as therapist_id_filled
    from responses
    inner join instruments using (instrument, instrument_version)
    left join item_totals using (response_id)
    left join episode_age using (episode_id)
    left join session_therapist using (session_id)
    left join episode_therapist using (response_id)
),

totals as (
    select
        *,
        case when kind = 'item_level' then n_items - items_answered end as items_missing,
        -- rounded to 6 decimals so that decimal answers (SRS 8.9 + 9.1) meet cutoffs exactly
        round(case
            when kind = 'total_only' then
                case when total_reported between total_min and total_max then total_reported end
            when items_answered = n_items then
                case when scoring_rule = 'mean' then item_mean else item_sum end
            -- prorate by mean substitution, only within the instrument's published allowance
            when items_answered > 0 and n_items - items_answered <= prorate_max_missing then
                case when scoring_rule = 'mean' then item_mean else item_mean * n_items end
        end, 6) as total
    from joined
),

-- the band with the highest lower bound not above the total (works for decimal totals too)
banded as (
    select
        totals.response_id,
        arg_max(bands.band, bands.band_order) as severity_band
    from totals
    inner join bands
        on totals.instrument = bands.instrument
        and totals.instrument_version = bands.instrument_version
        and totals.total >= bands.min_score
    group by totals.response_id
),

-- an age-specific cutoff wins over 'any'; an episode without an age group is treated as adult
cutoff_chosen as (
    select
        totals.response_id,
        arg_max(
            cutoffs.clinical_cutoff,
            case when cutoffs.age_group = coalesce(totals.age_group, 'adult') then 2 else 1 end
        ) as clinical_cutoff
    from totals
    inner join cutoffs
        on totals.instrument = cutoffs.instrument
        and totals.instrument_version = cutoffs.instrument_version
        and cutoffs.age_group in ('any', coalesce(totals.age_group, 'adult'))
    group by totals.response_id
),

flagged as (
    select
        totals.*,
        banded.severity_band,
        cutoff_chosen.clinical_cutoff,
        case totals.clinical_if
            when '<' then totals.total < cutoff_chosen.clinical_cutoff
            when '<=' then totals.total <= cutoff_chosen.clinical_cutoff
            when '>' then totals.total > cutoff_chosen.clinical_cutoff
            when '>=' then totals.total >= cutoff_chosen.clinical_cutoff
        end as clinical_range,
        coalesce(totals.caseness_threshold, cutoff_chosen.clinical_cutoff) as caseness_value,
        case totals.alliance_concern_operator
            when '<' then totals.total < totals.alliance_concern_cutoff
            when '<=' then totals.total <= totals.alliance_concern_cutoff
            when '>' then totals.total > totals.alliance_concern_cutoff
            when '>=' then totals.total >= totals.alliance_concern_cutoff
        end as alliance_concern
    from totals
    left join banded using (response_id)
    left join cutoff_chosen using (response_id)
),

final as (
    select
        ---------- ids
        response_id,
        event_id,
        clinic_id,
        patient_id,
        episode_id,
        session_id,
        therapist_id_filled as therapist_id,
        ---------- instrument
        instrument,
        instrument_version,
        construct,
        kind,
        respondent,
        timing,
        administered_at,
        ---------- scores
        total,
        total_reported,
        case
            when kind <> 'item_level' or total_reported is null or total is null then null
            -- a source may round a prorated total; otherwise the totals must agree exactly
            when items_missing > 0 then abs(total_reported - total) >= 0.5
            else abs(total_reported - total) > 1e-6
        end as total_mismatch,
        case when total is not null and kind = 'item_level' then round(item_mean, 6) end as mean_item,
        items_answered,
        case when kind = 'item_level' then n_items end as items_expected,
        coalesce(items_missing > 0 and total is not null, false) as prorated,
        case when items_missing > 0 and total is not null then items_missing else 0 end
            as prorated_items,
        reverse_keyed_items,
        total is not null as is_scorable,
        higher_is_better,
        ---------- interpretation
        severity_band,
        case
            when total is null then null
            when caseness_uses_cutoff then clinical_range
            when caseness_operator = '<' then total < caseness_value
            when caseness_operator = '<=' then total <= caseness_value
            when caseness_operator = '>' then total > caseness_value
            when caseness_operator = '>=' then total >= caseness_value
        end as caseness,
        age_group,
        clinical_cutoff,
        clinical_range,
        reliable_change,
        case when critical_item_missing then critical_item_flag
            else coalesce(critical_item_flag, false) end as critical_item_flag,
        critical_item_missing,
        critical_items,
        alliance_concern,
        ---------- history
        version_count,
        retracted_version_count,
        is_amended,
        occurred_at,
        recorded_at
    from flagged
)

select * from final
