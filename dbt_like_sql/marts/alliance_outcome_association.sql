-- Patient-level correlation of early alliance with residualised outcome change, overall and split
-- into between-therapist and within-therapist parts (Baldwin, Wampold & Imel 2007), for the whole
-- network (scope 'network') and for each clinic (scope 'clinic'), with n and a 95% CI (Fisher z).
-- Improvement = first minus last total (symptom scales) residualised on the first total by OLS over
-- the eligible episodes of the whole network. One row per patient: the latest closed eligible
-- episode (an open episode's last score is no end-of-treatment outcome; a patient with two
-- episodes counted twice).
with

params as (
    select
        (select value_text from seeds.parameters where name = 'assoc_outcome_instrument') as instrument,
        (select value_double from seeds.parameters where name = 'assoc_min_alliance_scores') as min_alliance_scores,
        (select value_double from seeds.parameters where name = 'assoc_min_outcome_scores') as min_outcome_scores,
        (select value_double from seeds.parameters where name = 'assoc_ci_z') as ci_z
),

episode_outcomes as (select * from marts.fct_episode_outcomes),

eligible as (
    select episode_outcomes.*
    from episode_outcomes
    cross join params
    where episode_outcomes.instrument = params.instrument
        and episode_outcomes.n_scores >= params.min_outcome_scores
        and episode_outcomes.alliance_scores_n >= params.min_alliance_scores
        and episode_outcomes.early_alliance is not null
        and episode_outcomes.therapist_id is not null
        and episode_outcomes.is_closed
    qualify row_number() over (partition by episode_outcomes.patient_id
                               order by episode_outcomes.closed_at desc,
                                        episode_outcomes.episode_id desc) = 1
),

fit as (
    select
        regr_intercept(improvement, first_total) as intercept,
        regr_slope(improvement, first_total) as slope
    from eligible
),

residualised as (
    select
        eligible.episode_id,
        eligible.therapist_id,
        eligible.clinic_id,
        eligible.early_alliance,
        eligible.improvement - (fit.intercept + fit.slope * eligible.first_total) as residual_improvement
    from eligible
    cross join fit
),

scoped as (
    select 'network' as scope, null::varchar as clinic_id, episode_id, therapist_id,
        early_alliance, residual_improvement
    from residualised
    union all
    select 'clinic' as scope, clinic_id, episode_id, therapist_id,
        early_alliance, residual_improvement
    from residualised
),

therapist_centred as (
    select
        *,
        avg(early_alliance) over t as therapist_mean_alliance,
        avg(residual_improvement) over t as therapist_mean_improvement
    from scoped
    window t as (partition by scope, clinic_id, therapist_id)
),

therapist_level as (
    select
        scope,
        clinic_id,
        therapist_id,
        avg(early_alliance) as therapist_mean_alliance,
        avg(residual_improvement) as therapist_mean_improvement,
        count(*) as therapist_patients
    from scoped
    group by scope, clinic_id, therapist_id
),

overall_part as (
    select
        scope,
        clinic_id,
        'overall' as part,
        corr(early_alliance, residual_improvement) as r,
        count(*) as n,
        count(distinct therapist_id) as n_therapists,
        count(*) as n_effective
    from scoped
    group by scope, clinic_id
),

within_part as (
    -- patients' deviations from their therapist's means; one df lost per therapist
    select
        scope,
        clinic_id,
        'within_therapist' as part,
        corr(early_alliance - therapist_mean_alliance,
             residual_improvement - therapist_mean_improvement) as r,
        count(*) as n,
        count(distinct therapist_id) as n_therapists,
        count(*) - count(distinct therapist_id) + 1 as n_effective
    from therapist_centred
    group by scope, clinic_id
),

between_part as (
    -- therapists' mean alliance against their patients' mean residual improvement
    select
        scope,
        clinic_id,
        'between_therapist' as part,
        corr(therapist_mean_alliance, therapist_mean_improvement) as r,
        cast(sum(therapist_patients) as bigint) as n,
        count(*) as n_therapists,
        count(*) as n_effective
    from therapist_level
    group by scope, clinic_id
),

parts as (
    -- No r where it means nothing: fewer than 3 independent observations (2 points always give
    -- +-1), or no variance (DuckDB's corr() then returns NaN, e.g. the between-therapist part
    -- of a clinic with one therapist).
    select * replace (case when n_effective >= 3 and not isnan(r) then r end as r)
    from (
        select * from overall_part
        union all
        select * from within_part
        union all
        select * from between_part
    )
),

final as (
    select
        parts.scope,
        parts.clinic_id,
        parts.part,
        params.instrument as outcome_instrument,
        parts.r,
        parts.n,
        parts.n_therapists,
        parts.n_effective,
        case when parts.n_effective > 3 and abs(parts.r) < 1
            then tanh(atanh(parts.r) - params.ci_z / sqrt(parts.n_effective - 3)) end as ci_low,
        case when parts.n_effective > 3 and abs(parts.r) < 1
            then tanh(atanh(parts.r) + params.ci_z / sqrt(parts.n_effective - 3)) end as ci_high
    from parts
    cross join params
)

select * from final
