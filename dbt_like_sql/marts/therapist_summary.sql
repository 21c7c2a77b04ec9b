-- One row per therapist and clinic over all time: caseload, alliance, candidate ruptures and
-- repairs, outcomes of closed episodes (outcome instrument: assoc_outcome_instrument, default
-- PHQ-9) and measurement completeness. Rates are fractions 0..1; small cells are flagged.
with

params as (
    select
        (select value_text from seeds.parameters where name = 'assoc_outcome_instrument') as outcome_instrument,
        (select value_double from seeds.parameters where name = 'min_cell_size') as min_cell_size
),

alliance_sessions as (select * from marts.fct_alliance_sessions where therapist_id is not null),

outcome_sessions as (select * from marts.fct_outcome_sessions),

episode_outcomes as (
    select episode_outcomes.*
    from marts.fct_episode_outcomes as episode_outcomes
    cross join params
    where episode_outcomes.instrument = params.outcome_instrument
        and episode_outcomes.is_closed
        and episode_outcomes.therapist_id is not null
),

-- every closed episode, with or without an outcome series: the dropout rate counts them all
episode_endings as (select * from marts.fct_episode_endings where therapist_id is not null),

ending_measures as (
    select
        therapist_id,
        clinic_id,
        count(*) as episodes_ended,
        avg(case when is_dropout then 1.0 else 0.0 end) as dropout_rate
    from episode_endings
    group by therapist_id, clinic_id
),

sessions_with_outcome as (
    select distinct session_id from outcome_sessions where session_id is not null
),

session_measures as (
    select
        alliance_sessions.therapist_id,
        alliance_sessions.clinic_id,
        count(distinct alliance_sessions.patient_id) as patients,
        count(distinct alliance_sessions.episode_id) as episodes_seen,
        count(*) as sessions_attended,
        avg(alliance_sessions.alliance_total) as mean_alliance,
        avg(case when alliance_sessions.srs_concern then 1.0 else 0.0 end)
            filter (where alliance_sessions.srs_total is not null) as srs_concern_rate,
        count(*) filter (where alliance_sessions.is_candidate_rupture) as candidate_ruptures,
        count(*) filter (where alliance_sessions.is_candidate_rupture)
            / nullif(count(alliance_sessions.alliance_change), 0) as rupture_rate,
        count(*) filter (where alliance_sessions.is_candidate_rupture
            and alliance_sessions.is_repaired is null) as ruptures_pending,
        -- over the ruptures whose repair window is over (a pending one is not yet unrepaired)
        count(*) filter (where alliance_sessions.is_repaired)
            / nullif(count(alliance_sessions.is_repaired), 0) as repair_rate,
        avg(case when alliance_sessions.alliance_total is not null then 1.0 else 0.0 end)
            as alliance_completeness,
        avg(case when sessions_with_outcome.session_id is not null then 1.0 else 0.0 end)
            as outcome_completeness
    from alliance_sessions
    left join sessions_with_outcome on alliance_sessions.session_id = sessions_with_outcome.session_id
    group by alliance_sessions.therapist_id, alliance_sessions.clinic_id
),

outcome_measures as (
    select
        therapist_id,
        clinic_id,
        count(*) as episodes_closed,
        count(*) filter (where is_paired) as episodes_paired,
        avg(early_alliance) as mean_early_alliance,
        avg(case when reliably_improved then 1.0 else 0.0 end) filter (where is_paired)
            as reliable_improvement_rate,
        avg(case when jt_category = 'recovered' then 1.0 else 0.0 end)
            filter (where is_paired and clinical_before) as recovery_rate,
        avg(case when reliably_deteriorated then 1.0 else 0.0 end) filter (where is_paired)
            as deterioration_rate,
        avg(improvement) filter (where is_paired) as mean_improvement,
        avg(improvement_vs_expected) / any_value(network_intake_sd) as severity_adjusted_effect_size,
        -- the smallest non-zero denominator of the outcome columns (paired; paired and in the
        -- clinical range at intake; episodes with an early alliance, mean_early_alliance's)
        list_min(list_filter([count(*), count(*) filter (where is_paired),
            count(*) filter (where is_paired and clinical_before), count(early_alliance)],
            lambda n: n > 0))
            as smallest_outcome_base
    from episode_outcomes
    group by therapist_id, clinic_id
),

joined as (
    select
        coalesce(session_measures.therapist_id, outcome_measures.therapist_id,
                 ending_measures.therapist_id) as therapist_id,
        coalesce(session_measures.clinic_id, outcome_measures.clinic_id, ending_measures.clinic_id)
            as clinic_id,
        coalesce(session_measures.patients, 0) as patients,
        coalesce(session_measures.episodes_seen, 0) as episodes_seen,
        coalesce(session_measures.sessions_attended, 0) as sessions_attended,
        session_measures.mean_alliance,
        outcome_measures.mean_early_alliance,
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
        ending_measures.dropout_rate,
        outcome_measures.mean_improvement,
        outcome_measures.severity_adjusted_effect_size,
        outcome_measures.smallest_outcome_base
    from session_measures
    full outer join outcome_measures
        on session_measures.therapist_id = outcome_measures.therapist_id
        and session_measures.clinic_id = outcome_measures.clinic_id
    full outer join ending_measures
        on coalesce(session_measures.therapist_id, outcome_measures.therapist_id) = ending_measures.therapist_id
        and coalesce(session_measures.clinic_id, outcome_measures.clinic_id) = ending_measures.clinic_id
),

final as (
    select
        joined.* exclude (smallest_outcome_base),
        params.outcome_instrument,
        joined.patients < params.min_cell_size as is_small_cell,
        -- the outcome columns rest on closed episodes, not patients: as clinic_monthly's flag,
        -- small when the closed episodes are fewer than min_cell_size or any outcome rate's own
        -- denominator holds 1 to min_cell_size - 1 episodes
        joined.episodes_closed < params.min_cell_size
            or coalesce(joined.smallest_outcome_base < params.min_cell_size, false)
            as is_small_cell_outcomes
    from joined
    cross join params
)

select * from final
