-- One row per clinic and calendar month (scope 'clinic'), plus one per month for the whole network
-- (scope 'network', clinic_id NULL) as the report's comparison line. Session measures count the
-- attended sessions of the month; outcome measures count the episodes that closed in the month
-- (outcome instrument: assoc_outcome_instrument, default PHQ-9). Rates are fractions 0..1.
with

params as (
    select
        (select value_text from seeds.parameters where name = 'assoc_outcome_instrument') as outcome_instrument,
        (select value_double from seeds.parameters where name = 'min_cell_size') as min_cell_size
),

alliance_sessions as (select * from marts.fct_alliance_sessions),

outcome_sessions as (select * from marts.fct_outcome_sessions),

episode_outcomes as (
    select episode_outcomes.*
    from marts.fct_episode_outcomes as episode_outcomes
    cross join params
    where episode_outcomes.instrument = params.outcome_instrument
        and episode_outcomes.is_closed
),

-- every closed episode, with or without an outcome series: the dropout rate counts them all
episode_endings as (select * from marts.fct_episode_endings),

ending_scopes as (
    select 'clinic' as scope, clinic_id, ended_month as month, is_dropout from episode_endings
    union all
    select 'network' as scope, null::varchar as clinic_id, ended_month as month, is_dropout
    from episode_endings
),

ending_measures as (
    select
        scope,
        clinic_id,
        month,
        count(*) as episodes_ended,
        avg(case when is_dropout then 1.0 else 0.0 end) as dropout_rate
    from ending_scopes
    group by scope, clinic_id, month
),

sessions_with_outcome as (
    select distinct session_id from outcome_sessions where session_id is not null
),

session_facts as (
    select
        alliance_sessions.*,
        sessions_with_outcome.session_id is not null as has_outcome_score
    from alliance_sessions
    left join sessions_with_outcome on alliance_sessions.session_id = sessions_with_outcome.session_id
),

session_scopes as (
    select 'clinic' as scope, clinic_id, session_month as month, * exclude (clinic_id)
    from session_facts
    union all
    select 'network' as scope, null::varchar as clinic_id, session_month as month, * exclude (clinic_id)
    from session_facts
),

session_measures as (
    select
        scope,
        clinic_id,
        month,
        count(distinct patient_id) as patients,
        count(distinct therapist_id) as therapists,
        count(*) as sessions_attended,
        avg(alliance_total) as mean_alliance,
        avg(case when srs_concern then 1.0 else 0.0 end) filter (where srs_total is not null)
            as srs_concern_rate,
        count(alliance_change) as alliance_changes,
        count(*) filter (where is_candidate_rupture) as candidate_ruptures,
        count(*) filter (where is_candidate_rupture) / nullif(count(alliance_change), 0)
            as rupture_rate,
        count(*) filter (where is_candidate_rupture and is_repaired is null) as ruptures_pending,
        -- over the ruptures whose repair window is over (a pending one is not yet unrepaired)
        count(*) filter (where is_repaired) / nullif(count(is_repaired), 0) as repair_rate,
        avg(case when alliance_total is not null then 1.0 else 0.0 end) as alliance_completeness,
        avg(case when has_outcome_score then 1.0 else 0.0 end) as outcome_completeness
    from session_scopes
    group by scope, clinic_id, month
),

outcome_scopes as (
    select 'clinic' as scope, clinic_id, outcome_month as month, * exclude (clinic_id)
    from episode_outcomes
    union all
    select 'network' as scope, null::varchar as clinic_id, outcome_month as month, * exclude (clinic_id)
    from episode_outcomes
),

outcome_measures as (
    select
        scope,
        clinic_id,
        month,
        count(*) as episodes_closed,
        count(*) filter (where is_paired) as episodes_paired,
        avg(case when reliably_improved then 1.0 else 0.0 end) filter (where is_paired)
            as reliable_improvement_rate,
        avg(case when jt_category = 'recovered' then 1.0 else 0.0 end)
            filter (where is_paired and clinical_before) as recovery_rate,
        avg(case when reliably_deteriorated then 1.0 else 0.0 end) filter (where is_paired)
            as deterioration_rate,
        avg(case when nhstt_recovered then 1.0 else 0.0 end) filter (where nhstt_case_at_start)
            as nhstt_recovery_rate,
        avg(case when nhstt_reliable_improvement then 1.0 else 0.0 end) filter (where nhstt_eligible)
            as nhstt_reliable_improvement_rate,
        avg(improvement) filter (where is_paired) as mean_improvement,
        avg(expected_improvement) filter (where is_paired) as mean_expected_improvement,
        avg(improvement_vs_expected) / any_value(network_intake_sd) as severity_adjusted_effect_size,
        -- the smallest non-zero denominator of the outcome rates (each rate has its own: paired,
        -- paired and in the clinical range at intake, NHS TT cases, NHS TT eligible)
        list_min(list_filter([count(*), count(*) filter (where is_paired),
            count(*) filter (where is_paired and clinical_before),
            count(*) filter (where nhstt_case_at_start), count(*) filter (where nhstt_eligible)],
            lambda n: n > 0)) as smallest_outcome_base
    from outcome_scopes
    group by scope, clinic_id, month
),

joined as (
    select
        coalesce(session_measures.scope, outcome_measures.scope, ending_measures.scope) as scope,
        coalesce(session_measures.clinic_id, outcome_measures.clinic_id, ending_measures.clinic_id)
            as clinic_id,
        coalesce(session_measures.month, outcome_measures.month, ending_measures.month) as month,
        coalesce(session_measures.patients, 0) as patients,
        coalesce(session_measures.therapists, 0) as therapists,
        coalesce(session_measures.sessions_attended, 0) as sessions_attended,
        session_measures.mean_alliance,
        session_measures.srs_concern_rate,
        coalesce(session_measures.candidate_ruptures, 0) as candidate_ruptures,
        session_measures.rupture_rate,
        coalesce(session_measures.ruptures_pending, 0) as ruptures_pending,
        session_measures.repair_rate,
        session_measures.alliance_completeness,
        session_measures.outcome_completeness,
        coalesce(ending_measures.episodes_ended, 0) as episodes_ended,
        coalesce(outcome_measures.episodes_closed, 0) as episodes_closed,
        coalesce(outcome_measures.episodes_paired, 0) as episodes_paired,
        outcome_measures.reliable_improvement_rate,
        outcome_measures.recovery_rate,
        outcome_measures.deterioration_rate,
        outcome_measures.nhstt_recovery_rate,
        outcome_measures.nhstt_reliable_improvement_rate,
        ending_measures.dropout_rate,
        outcome_measures.mean_improvement,
        outcome_measures.mean_expected_improvement,
        outcome_measures.severity_adjusted_effect_size,
        outcome_measures.smallest_outcome_base
    from session_measures
    full outer join outcome_measures
        on session_measures.scope = outcome_measures.scope
        and session_measures.clinic_id is not distinct from outcome_measures.clinic_id
        and session_measures.month = outcome_measures.month
    full outer join ending_measures
        on coalesce(session_measures.scope, outcome_measures.scope) = ending_measures.scope
        and coalesce(session_measures.clinic_id, outcome_measures.clinic_id)
            is not distinct from ending_measures.clinic_id
        and coalesce(session_measures.month, outcome_measures.month) = ending_measures.month
),

final as (
    select
        joined.* exclude (smallest_outcome_base),
        params.outcome_instrument,
        joined.patients < params.min_cell_size as is_small_cell_patients,
        -- small when any outcome rate rests on 1 to min_cell_size - 1 episodes (its denominator),
        -- not only when the closed episodes are few
        joined.episodes_closed < params.min_cell_size
            or coalesce(joined.smallest_outcome_base < params.min_cell_size, false)
            as is_small_cell_outcomes
    from joined
    cross join params
)

select * from final
