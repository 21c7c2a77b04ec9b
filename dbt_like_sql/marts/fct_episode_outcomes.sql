-- One row per episode and outcome instrument: first and last score, change, Jacobson-Truax
-- reliable change and clinical-significance category, response and remission; plus episode-level
-- columns repeated on each instrument row: NHS Talking Therapies paired PHQ-9 + GAD-7 outcomes,
-- three dropout definitions, early alliance, and the severity-adjusted (expected) improvement.
with

params as (
    select
        (select value_text from seeds.parameters where name = 'jt_sd_source') as jt_sd_source,
        (select value_double from seeds.parameters where name = 'jt_z') as jt_z,
        (select value_text from seeds.parameters where name = 'jt_reference_scope') as jt_reference_scope,
        (select value_text from seeds.parameters where name = 'jt_cutoff_type') as jt_cutoff_type,
        (select value_double from seeds.parameters where name = 'response_reduction') as response_reduction,
        (select value_double from seeds.parameters where name = 'nhstt_min_sessions') as nhstt_min_sessions,
        (select value_double from seeds.parameters where name = 'nhstt_phq9_caseness') as phq9_caseness,
        (select value_double from seeds.parameters where name = 'nhstt_gad7_caseness') as gad7_caseness,
        (select value_double from seeds.parameters where name = 'nhstt_phq9_reliable_change') as phq9_rc,
        (select value_double from seeds.parameters where name = 'nhstt_gad7_reliable_change') as gad7_rc,
        (select value_text from seeds.parameters where name = 'dropout_definition') as dropout_definition,
        (select value_double from seeds.parameters where name = 'dropout_min_sessions') as dropout_min_sessions,
        (select value_double from seeds.parameters where name = 'early_alliance_sessions') as early_alliance_sessions
),

instrument_params as (
    -- per-instrument parameters are named '<rule>.<instrument code>'
    select
        split_part(name, '.', 2) as instrument,
        max(value_double) filter (where split_part(name, '.', 1) = 'jt_reliability') as jt_reliability,
        max(value_double) filter (where split_part(name, '.', 1) = 'jt_functional_mean') as functional_mean,
        max(value_double) filter (where split_part(name, '.', 1) = 'jt_functional_sd') as functional_sd,
        max(value_double) filter (where split_part(name, '.', 1) = 'remission_below') as remission_below
    from seeds.parameters
    where name like '%.%'
    group by split_part(name, '.', 2)
),

instruments as (select * from seeds.instruments),

outcome_sessions as (select * from marts.fct_outcome_sessions),

episodes as (select * from core.episodes),

alliance_sessions as (select * from marts.fct_alliance_sessions),

first_last as (
    select
        episode_id,
        instrument,
        any_value(patient_id) as patient_id,
        any_value(clinic_id) as clinic_id,
        -- the intake score's definition version gives the reliable change and cutoffs, so a
        -- clinic's version 2 of an instrument is judged by its own values
        arg_min(instrument_version, measure_position) as instrument_version,
        count(*) as n_scores,
        arg_min(total, measure_position) as first_total,
        arg_max(total, measure_position) as last_total,
        min(measure_position) as first_position,
        max(measure_position) as last_position,
        arg_min(caseness, measure_position) as first_caseness,
        arg_max(caseness, measure_position) as last_caseness,
        arg_min(clinical_cutoff, measure_position) as instrument_cutoff,
        any_value(higher_is_better) as higher_is_better,
        max(administered_at) as last_administered_at
    from outcome_sessions
    group by episode_id, instrument
),

with_changes as (
    select
        *,
        last_total - first_total as change,
        case when higher_is_better then last_total - first_total else first_total - last_total end
            as improvement,
        n_scores >= 2 as is_paired
    from first_last
),

intake_distribution as (
    -- the clinic's (or network's) intake distribution: first scores of complete pairs
    select
        case when params.jt_reference_scope = 'network' then '*' else with_changes.clinic_id end
            as reference_group,
        with_changes.instrument,
        with_changes.instrument_version,
        count(*) as intake_n,
        avg(with_changes.first_total) as intake_mean,
        stddev_samp(with_changes.first_total) as intake_sd
    from with_changes
    cross join params
    where with_changes.is_paired
    group by all
),

with_reference as (
    select
        with_changes.*,
        intake_distribution.intake_n,
        intake_distribution.intake_mean,
        intake_distribution.intake_sd,
        coalesce(instrument_params.jt_reliability, instruments.rc_reliability) as jt_reliability,
        instrument_params.functional_mean,
        instrument_params.functional_sd,
        instrument_params.remission_below,
        instruments.reliable_change as instrument_reliable_change,
        params.*
    from with_changes
    cross join params
    left join intake_distribution
        on intake_distribution.instrument = with_changes.instrument
        and intake_distribution.instrument_version = with_changes.instrument_version
        and intake_distribution.reference_group
            = case when params.jt_reference_scope = 'network' then '*' else with_changes.clinic_id end
    left join instruments
        on with_changes.instrument = instruments.instrument
        and with_changes.instrument_version = instruments.instrument_version
    left join instrument_params on with_changes.instrument = instrument_params.instrument
),

jt_terms as (
    select
        *,
        case
            when jt_sd_source = 'intake' then sqrt(2) * intake_sd * sqrt(1 - jt_reliability)
            else instrument_reliable_change / jt_z
        end as jt_s_diff,
        case
            when jt_cutoff_type = 'a' and higher_is_better then intake_mean + 2 * intake_sd
            when jt_cutoff_type = 'a' then intake_mean - 2 * intake_sd
            when jt_cutoff_type = 'b' and functional_sd is not null and higher_is_better
                then functional_mean - 2 * functional_sd
            when jt_cutoff_type = 'b' and functional_sd is not null
                then functional_mean + 2 * functional_sd
            when jt_cutoff_type = 'c' and functional_sd is not null
                then (functional_sd * intake_mean + intake_sd * functional_mean)
                    / (functional_sd + intake_sd)
        end as jt_cutoff_abc
    from with_reference
),

jt_cutoffs as (
    select
        *,
        coalesce(jt_cutoff_abc, instrument_cutoff) as jt_cutoff,
        case when jt_cutoff_abc is not null then jt_cutoff_type else 'instrument' end as jt_cutoff_used,
        improvement / jt_s_diff as rci,
        -- Reliable change. With the instrument's value, a change of at least that size counts
        -- (the definitions give "the smallest change counted as reliable"); comparing the points
        -- directly keeps a change of exactly that size from falling to rounding (6 / (6 / z) is
        -- not always >= z in floating point). With the intake error term, |RCI| > z (Jacobson &
        -- Truax 1991).
        case when jt_sd_source = 'intake' then improvement / jt_s_diff > jt_z
            else improvement >= instrument_reliable_change end as rc_improved,
        case when jt_sd_source = 'intake' then improvement / jt_s_diff < -jt_z
            else improvement <= -instrument_reliable_change end as rc_deteriorated
    from jt_terms
),

jt_ranges as (
    -- clinical range before and after: by the a/b/c cutoff, or by the instrument's own caseness
    select
        *,
        case
            when jt_cutoff_abc is null then first_caseness
            when higher_is_better then first_total < jt_cutoff_abc
            else first_total > jt_cutoff_abc
        end as clinical_before,
        case
            when jt_cutoff_abc is null then last_caseness
            when higher_is_better then last_total < jt_cutoff_abc
            else last_total > jt_cutoff_abc
        end as clinical_after
    from jt_cutoffs
),

jt_categories as (
    select
        *,
        case
            when not is_paired or rci is null then null
            when rc_improved and clinical_before and not clinical_after then 'recovered'
            when rc_improved then 'improved'
            when rc_deteriorated and not clinical_before and clinical_after then 'harmed'
            when rc_deteriorated then 'deteriorated'
            else 'unchanged'
        end as jt_category
    from jt_ranges
),

nhstt_pairs as (
    -- paired PHQ-9 and GAD-7 per episode
    select
        episode_id,
        max(first_total) filter (where instrument = 'PHQ-9' and is_paired) as phq9_first,
        max(last_total) filter (where instrument = 'PHQ-9' and is_paired) as phq9_last,
        max(first_total) filter (where instrument = 'GAD-7' and is_paired) as gad7_first,
        max(last_total) filter (where instrument = 'GAD-7' and is_paired) as gad7_last
    from with_changes
    group by episode_id
),

nhstt_flags as (
    select
        nhstt_pairs.episode_id,
        episodes.is_closed
            and episodes.sessions_attended >= params.nhstt_min_sessions
            and nhstt_pairs.phq9_last is not null
            and nhstt_pairs.gad7_last is not null as nhstt_eligible,
        nhstt_pairs.phq9_first >= params.phq9_caseness
            or nhstt_pairs.gad7_first >= params.gad7_caseness as nhstt_case_at_start,
        nhstt_pairs.phq9_last < params.phq9_caseness
            and nhstt_pairs.gad7_last < params.gad7_caseness as nhstt_below_caseness_at_end,
        nhstt_pairs.phq9_first - nhstt_pairs.phq9_last >= params.phq9_rc
            or nhstt_pairs.gad7_first - nhstt_pairs.gad7_last >= params.gad7_rc as any_reliable_decrease,
        nhstt_pairs.phq9_last - nhstt_pairs.phq9_first >= params.phq9_rc
            or nhstt_pairs.gad7_last - nhstt_pairs.gad7_first >= params.gad7_rc as any_reliable_increase
    from nhstt_pairs
    cross join params
    left join episodes on nhstt_pairs.episode_id = episodes.episode_id
),

nhstt as (
    select
        episode_id,
        nhstt_eligible,
        case when nhstt_eligible then nhstt_case_at_start end as nhstt_case_at_start,
        case when nhstt_eligible and nhstt_case_at_start then nhstt_below_caseness_at_end end
            as nhstt_recovered,
        case when nhstt_eligible then any_reliable_decrease and not any_reliable_increase end
            as nhstt_reliable_improvement,
        case when nhstt_eligible and nhstt_case_at_start
            then nhstt_below_caseness_at_end and any_reliable_decrease and not any_reliable_increase
        end as nhstt_reliable_recovery,
        case when nhstt_eligible then any_reliable_increase and not any_reliable_decrease end
            as nhstt_reliable_deterioration
    from nhstt_flags
),

early_alliance as (
    select
        alliance_sessions.episode_id,
        count(alliance_sessions.alliance_total) as alliance_scores_n,
        avg(alliance_sessions.alliance_total) filter (
            where alliance_sessions.alliance_score_number <= params.early_alliance_sessions
        ) as early_alliance
    from alliance_sessions
    cross join params
    group by alliance_sessions.episode_id
),

expected_change as (
    -- expected improvement given intake severity, fitted over the whole network (closed, paired)
    select
        instrument,
        instrument_version,
        regr_intercept(improvement, first_total) as expected_intercept,
        regr_slope(improvement, first_total) as expected_slope,
        stddev_samp(first_total) as network_intake_sd
    from with_changes
    where is_paired
        and episode_id in (select episode_id from episodes where is_closed)
    group by instrument, instrument_version
),

dropout as (
    select
        episodes.episode_id,
        episodes.is_closed and episodes.end_reason = 'dropout' as dropout_end_reason,
        episodes.is_closed and episodes.sessions_attended < params.dropout_min_sessions
            as dropout_attendance
    from episodes
    cross join params
),

final as (
    select
        ---------- ids
        jt_categories.episode_id,
        jt_categories.instrument,
        jt_categories.instrument_version,
        jt_categories.patient_id,
        episodes.therapist_id,
        jt_categories.clinic_id,
        episodes.is_closed,
        episodes.end_reason,
        episodes.closed_at,
        cast(date_trunc('month', coalesce(episodes.closed_at, jt_categories.last_administered_at)) as date)
            as outcome_month,
        episodes.sessions_attended,
        ---------- first and last
        jt_categories.n_scores,
        jt_categories.is_paired,
        jt_categories.first_position,
        jt_categories.last_position,
        jt_categories.first_total,
        jt_categories.last_total,
        jt_categories.change,
        jt_categories.improvement,
        jt_categories.higher_is_better,
        jt_categories.first_caseness,
        jt_categories.last_caseness,
        ---------- Jacobson-Truax
        jt_categories.jt_sd_source,
        jt_categories.jt_reliability,
        jt_categories.intake_n,
        jt_categories.intake_mean,
        jt_categories.intake_sd,
        jt_categories.jt_s_diff,
        jt_categories.rci,
        case when jt_categories.is_paired then jt_categories.rc_improved end as reliably_improved,
        case when jt_categories.is_paired then jt_categories.rc_deteriorated end
            as reliably_deteriorated,
        jt_categories.jt_cutoff_used,
        jt_categories.jt_cutoff,
        jt_categories.clinical_before,
        jt_categories.clinical_after,
        jt_categories.jt_category,
        ---------- response and remission (symptom scales)
        case when jt_categories.is_paired and not jt_categories.higher_is_better
                and jt_categories.first_total > 0
            then jt_categories.improvement >= jt_categories.response_reduction * jt_categories.first_total
        end as is_response,
        case when jt_categories.is_paired then coalesce(
            jt_categories.last_total < jt_categories.remission_below, not jt_categories.last_caseness)
        end as is_remission,
        ---------- severity-adjusted change
        expected_change.expected_intercept + expected_change.expected_slope * jt_categories.first_total
            as expected_improvement,
        case when jt_categories.is_paired then jt_categories.improvement
            - (expected_change.expected_intercept + expected_change.expected_slope * jt_categories.first_total)
        end as improvement_vs_expected,
        expected_change.network_intake_sd,
        ---------- NHS Talking Therapies (episode level)
        nhstt.nhstt_eligible,
        nhstt.nhstt_case_at_start,
        nhstt.nhstt_recovered,
        nhstt.nhstt_reliable_improvement,
        nhstt.nhstt_reliable_recovery,
        nhstt.nhstt_reliable_deterioration,
        ---------- dropout (episode level)
        dropout.dropout_end_reason,
        dropout.dropout_attendance,
        episodes.is_closed and coalesce(episodes.end_reason, 'other') <> 'planned'
            and not coalesce(jt_categories.rc_improved, false) as dropout_unimproved,
        case jt_categories.dropout_definition
            when 'attendance' then dropout.dropout_attendance
            when 'unimproved' then episodes.is_closed and coalesce(episodes.end_reason, 'other') <> 'planned'
                and not coalesce(jt_categories.rc_improved, false)
            else dropout.dropout_end_reason
        end as is_dropout,
        ---------- alliance (episode level)
        early_alliance.alliance_scores_n,
        early_alliance.early_alliance
    from jt_categories
    left join episodes on jt_categories.episode_id = episodes.episode_id
    left join nhstt on jt_categories.episode_id = nhstt.episode_id
    left join early_alliance on jt_categories.episode_id = early_alliance.episode_id
    left join expected_change
        on jt_categories.instrument = expected_change.instrument
        and jt_categories.instrument_version = expected_change.instrument_version
    left join dropout on jt_categories.episode_id = dropout.episode_id
)

select * from final
