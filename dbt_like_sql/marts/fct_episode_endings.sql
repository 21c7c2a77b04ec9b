-- One row per closed episode, with or without an outcome series (a patient who drops out often
-- never fills in a questionnaire): the base of the dropout rates of clinic_monthly and
-- therapist_summary. is_dropout is fct_episode_outcomes' (outcome instrument:
-- assoc_outcome_instrument) where the episode has an outcome series, else the same definition
-- (parameter dropout_definition) read from core.episodes; without a series there is no reliable
-- improvement, as in that mart.
with

params as (
    select
        (select value_text from seeds.parameters where name = 'assoc_outcome_instrument') as outcome_instrument,
        (select value_text from seeds.parameters where name = 'dropout_definition') as dropout_definition,
        (select value_double from seeds.parameters where name = 'dropout_min_sessions') as dropout_min_sessions
),

episodes as (select * from core.episodes where is_closed),

outcome_series as (
    select episode_outcomes.episode_id, episode_outcomes.is_dropout
    from marts.fct_episode_outcomes as episode_outcomes
    cross join params
    where episode_outcomes.instrument = params.outcome_instrument
),

final as (
    select
        episodes.episode_id,
        episodes.clinic_id,
        episodes.therapist_id,
        episodes.closed_at,
        cast(date_trunc('month', episodes.closed_at) as date) as ended_month,
        episodes.end_reason,
        outcome_series.episode_id is not null as has_outcome_series,
        coalesce(outcome_series.is_dropout, case params.dropout_definition
            when 'attendance' then episodes.sessions_attended < params.dropout_min_sessions
            when 'unimproved' then coalesce(episodes.end_reason, 'other') <> 'planned'
            else episodes.end_reason = 'dropout'
        end) as is_dropout
    from episodes
    cross join params
    left join outcome_series on episodes.episode_id = outcome_series.episode_id
)

select * from final
