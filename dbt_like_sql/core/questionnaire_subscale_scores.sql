-- One row per subscale of every current questionnaire response (e.g. WAI-SR task, bond, goal).
-- A subscale is scored only when all its items are answered: no published guidance allows
-- prorating the short subscales, so score is NULL otherwise.
with

item_answers as (select * from core.questionnaire_item_answers),
subscales as (select * from seeds.instrument_subscales),

subscale_items as (
    select
        item_answers.response_id,
        item_answers.instrument,
        item_answers.instrument_version,
        subscales.subscale,
        subscales.scoring_rule,
        subscales.n_items,
        item_answers.item_score
    from item_answers
    inner join subscales using (instrument, instrument_version, item)
),

aggregated as (
    select
        response_id,
        instrument,
        instrument_version,
        subscale,
        any_value(scoring_rule) as scoring_rule,
        any_value(n_items) as items_expected,
        count(item_score) as items_answered,
        round(sum(item_score), 6) as item_sum,
        round(avg(item_score), 6) as item_mean
    from subscale_items
    group by response_id, instrument, instrument_version, subscale
),

scored as (
    select
        response_id,
        instrument,
        instrument_version,
        subscale,
        case
            when items_answered < items_expected then null
            when scoring_rule = 'mean' then item_mean
            else item_sum
        end as score,
        case when items_answered = items_expected then item_mean end as mean_item,
        items_answered,
        items_expected,
        items_answered = items_expected as is_scorable
    from aggregated
)

select * from scored
