-- Sudden gains and sudden losses (Tang & DeRubeis 1999) exactly as the R package suddengains
-- (Wiedemann et al. 2020) applies them: identify_sg / identify_sl for the criteria,
-- create_bysg for magnitude and reversal. One row per interval that meets all three criteria.
-- The measurement list of an episode is positions first_position..n: sessions 1..n (n = attended
-- sessions), plus the intake score as position 0 when sg_identify_1to2 = 1. Missing scores stay
-- as gaps in the list, as NA columns do in the package's wide data.
with

params as (
    select
        (select value_text from seeds.parameters where name = 'sg_instrument') as instrument,
        (select value_text from seeds.parameters where name = 'sg_crit1_source') as crit1_source,
        (select value_double from seeds.parameters where name = 'sg_crit1_cutoff') as crit1_fixed,
        (select value_double from seeds.parameters where name = 'sg_crit2_pct') as crit2_pct,
        (select value_double from seeds.parameters where name = 'sg_crit3_t_df2') as t_df2,
        (select value_double from seeds.parameters where name = 'sg_crit3_t_df3') as t_df3,
        (select value_double from seeds.parameters where name = 'sg_crit3_t_df4') as t_df4,
        case when (select value_double from seeds.parameters where name = 'sg_identify_1to2') = 1
            then 0 else 1 end as first_position,
        -- The criteria (magnitude = pre - post, 25% of the pre-gain score) are defined for symptom
        -- scales where lower is better; on a scale where higher is better every improvement would
        -- come out as a "loss". Such an instrument stops the build instead.
        case when exists (
            select 1 from seeds.instruments
            where instrument = (select value_text from seeds.parameters where name = 'sg_instrument')
                and higher_is_better
        ) then error('parameters.yml, sg_instrument = '
            || (select value_text from seeds.parameters where name = 'sg_instrument')
            || ': a scale where higher is better; sudden gains and losses (Tang & DeRubeis 1999, '
            || 'suddengains) are defined for symptom scales where lower is better (e.g. PHQ-9)')
        end as direction_error
),

instruments as (select * from seeds.instruments),

scores as (
    select fct_outcome_sessions.*
    from marts.fct_outcome_sessions
    inner join params on fct_outcome_sessions.instrument = params.instrument
    where params.direction_error is null
),

episodes as (select * from core.episodes),

episode_lists as (
    -- one measurement list per episode: first_position .. last attended session number
    select
        scores.episode_id,
        scores.instrument,
        any_value(scores.patient_id) as patient_id,
        -- the therapist of the episode's latest score (any_value picked one at random when
        -- the therapist changed during the episode)
        arg_max(scores.therapist_id, scores.measure_position) as therapist_id,
        any_value(scores.clinic_id) as clinic_id,
        greatest(max(scores.measure_position), any_value(episodes.sessions_attended))
            as last_position
    from scores
    left join episodes on scores.episode_id = episodes.episode_id
    group by scores.episode_id, scores.instrument
),

grid as (
    select
        episode_lists.*,
        unnest(range(params.first_position, episode_lists.last_position + 1)) as position
    from episode_lists
    cross join params
),

series as (
    select
        grid.*,
        scores.total,
        scores.instrument_version,
        scores.response_id,
        scores.administered_at
    from grid
    left join scores
        on grid.episode_id = scores.episode_id and grid.position = scores.measure_position
),

windows as (
    -- pre window: the pre-gain score and up to 2 before it; post window: the post-gain score and
    -- up to 2 after it; rows outside the list do not exist, missing scores are ignored (na.rm)
    select
        *,
        lead(total) over w as post_total,
        lead(response_id) over w as post_response_id,
        lead(administered_at) over w as post_administered_at,
        avg(total) over (w rows between 2 preceding and current row) as mean_pre,
        stddev_samp(total) over (w rows between 2 preceding and current row) as sd_pre,
        count(total) over (w rows between 2 preceding and current row) as n_pre,
        avg(total) over (w rows between 1 following and 3 following) as mean_post,
        stddev_samp(total) over (w rows between 1 following and 3 following) as sd_post,
        count(total) over (w rows between 1 following and 3 following) as n_post,
        first_value(total ignore nulls) over (w rows between unbounded preceding and unbounded following) as first_total,
        last_value(total ignore nulls) over (w rows between unbounded preceding and unbounded following) as last_total
    from series
    window w as (partition by episode_id order by position)
),

intervals as (
    select
        windows.*,
        windows.total - windows.post_total as magnitude,
        coalesce(
            case when params.crit1_source = 'reliable_change' then instruments.reliable_change end,
            params.crit1_fixed
        ) as crit1_cutoff,
        params.crit2_pct,
        params.first_position,
        case windows.n_pre + windows.n_post - 2
            when 2 then params.t_df2 when 3 then params.t_df3 when 4 then params.t_df4
        end as t_critical,
        sqrt(((windows.n_pre - 1) * windows.sd_pre ^ 2 + (windows.n_post - 1) * windows.sd_post ^ 2)
             / (windows.n_pre + windows.n_post - 2)) as pooled_sd
    from windows
    cross join params
    -- the pre-gain score's own definition version: a clinic's version 2 brings its own
    -- reliable change value
    left join instruments
        on windows.instrument = instruments.instrument
        and windows.instrument_version = instruments.instrument_version
    where windows.total is not null
        and windows.post_total is not null
        and windows.n_pre >= 2
        and windows.n_post >= 2
),

classified as (
    select
        *,
        case
            when magnitude >= crit1_cutoff
                and magnitude >= crit2_pct * total
                and mean_pre - mean_post > t_critical * pooled_sd then 'gain'
            -- identify_sl: crit 1 with the negated cutoff; crit 2 as the package codes it
            when magnitude <= -crit1_cutoff
                and magnitude <= crit2_pct * total
                and mean_post - mean_pre > t_critical * pooled_sd then 'loss'
        end as sg_type
    from intervals
),

identified as (
    select
        *,
        -- create_bysg: half the gain lost again; it numbers the list from 0, so later scores count
        -- from pre-gain position + 2 + first_position (+3 when session 1-2 is not examined)
        post_total + magnitude / 2 as reversal_value
    from classified
    where sg_type is not null
),

reversals as (
    select
        identified.episode_id,
        identified.position,
        bool_or(
            case when identified.sg_type = 'gain' then later.total > identified.reversal_value
                 else later.total < identified.reversal_value end
        ) as is_reversal
    from identified
    inner join series as later
        on later.episode_id = identified.episode_id
        and later.position >= identified.position + 2 + identified.first_position
        and later.total is not null
    group by identified.episode_id, identified.position
),

final as (
    select
        ---------- ids
        identified.episode_id || ':' || identified.instrument || ':' || identified.position
            as sudden_change_id,
        identified.episode_id,
        identified.patient_id,
        identified.therapist_id,
        identified.clinic_id,
        identified.instrument,
        identified.instrument_version,
        identified.sg_type,
        ---------- where
        identified.position as pre_position,
        identified.position + 1 as post_position,
        identified.response_id as pre_response_id,
        identified.post_response_id,
        identified.post_administered_at,
        cast(date_trunc('month', identified.post_administered_at) as date) as sg_month,
        ---------- size
        identified.total as pre_total,
        identified.post_total,
        identified.magnitude,
        -- create_bysg: sg_magnitude / tx_change for gains, abs(sg_magnitude) / tx_change for losses
        case when identified.sg_type = 'loss' then abs(identified.magnitude)
            else identified.magnitude end
            / nullif(identified.first_total - identified.last_total, 0) as change_proportion,
        ---------- criteria
        identified.crit1_cutoff,
        identified.mean_pre,
        identified.mean_post,
        identified.n_pre,
        identified.n_post,
        identified.t_critical,
        identified.pooled_sd,
        ---------- reversal
        identified.reversal_value,
        coalesce(reversals.is_reversal, false) as is_reversal
    from identified
    left join reversals
        on identified.episode_id = reversals.episode_id
        and identified.position = reversals.position
)

select * from final
