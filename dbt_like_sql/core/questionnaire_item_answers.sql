-- One row per item of every current questionnaire response (item-level instruments only):
-- the answer as given, whether it is missing, the score after reverse keying, critical flags.
-- Answers outside the item's range are quarantined at ingest; any that slip through count as
-- missing here (is_valid = false) rather than distorting a total.
with

responses as (select * from staging.stg_questionnaire_responses),
items as (select * from seeds.instrument_items),

answers as (
    select
        responses.response_id,
        responses.instrument,
        responses.instrument_version,
        items.item,
        items.item_number,
        items.min_value,
        items.max_value,
        items.reverse_keyed,
        items.critical_operator,
        items.critical_threshold,
        try_cast(
            json_extract_string(responses.answers, '$."' || items.item || '"') as double
        ) as answer
    from responses
    inner join items using (instrument, instrument_version)
),

checked as (
    select
        *,
        answer is not null and answer between min_value and max_value as is_valid
    from answers
),

scored as (
    select
        response_id,
        instrument,
        instrument_version,
        item,
        item_number,
        answer,
        not is_valid as is_missing,
        reverse_keyed,
        case
            when not is_valid then null
            when reverse_keyed then min_value + max_value - answer
            else answer
        end as item_score,
        case critical_operator
            when '>' then answer > critical_threshold
            when '>=' then answer >= critical_threshold
            when '<' then answer < critical_threshold
            when '<=' then answer <= critical_threshold
        end as is_critical,
        critical_operator is not null as is_critical_item
    from checked
)

select * from scored
