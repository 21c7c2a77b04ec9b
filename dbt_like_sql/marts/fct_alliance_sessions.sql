-- One row per attended session: the alliance scores given for it, the patient-centred deviation,
-- the SRS concern flag, the change from the previous scored session, candidate ruptures by two
-- rules and whether they were repaired. Ruptures are candidates: post-session scores are noisy.
with

params as (
    select
        (select value_text from seeds.parameters where name = 'alliance_instrument') as alliance_instrument,
        (select value_text from seeds.parameters where name = 'rupture_rule') as rupture_rule,
        (select value_double from seeds.parameters where name = 'rupture_k_own') as k_own,
        (select value_double from seeds.parameters where name = 'rupture_min_changes_own') as min_changes_own,
        (select value_double from seeds.parameters where name = 'rupture_k_clinic') as k_clinic,
        (select value_double from seeds.parameters where name = 'rupture_min_drop') as min_drop,
        (select value_double from seeds.parameters where name = 'rupture_repair_window') as repair_window,
        (select value_double from seeds.parameters where name = 'rupture_pending_max_days')
            as pending_max_days
),

attended_sessions as (
    select * from core.sessions where status = 'attended'
),

alliance_scores as (
    select * from core.questionnaire_scores
    where construct = 'alliance' and is_scorable and session_id is not null
),

subscale_scores as (
    select * from core.questionnaire_subscale_scores where instrument = 'WAI-SR'
),

srs as (
    select
        session_id,
        response_id as srs_response_id,
        total as srs_total,
        alliance_concern as srs_concern
    from alliance_scores
    where instrument = 'SRS'
    qualify row_number() over (partition by session_id order by administered_at desc, response_id desc) = 1
),

wai as (
    select
        session_id,
        response_id as wai_response_id,
        total as wai_total
    from alliance_scores
    where instrument = 'WAI-SR'
    qualify row_number() over (partition by session_id order by administered_at desc, response_id desc) = 1
),

wai_subscales as (
    select
        response_id as wai_response_id,
        max(score) filter (where subscale = 'goal') as wai_goal,
        max(score) filter (where subscale = 'task') as wai_task,
        max(score) filter (where subscale = 'bond') as wai_bond
    from subscale_scores
    group by response_id
),

joined as (
    select
        attended_sessions.session_id,
        attended_sessions.episode_id,
        attended_sessions.patient_id,
        attended_sessions.therapist_id,
        attended_sessions.clinic_id,
        attended_sessions.session_number,
        attended_sessions.session_at,
        attended_sessions.session_month,
        srs.srs_response_id,
        srs.srs_total,
        srs.srs_concern,
        wai.wai_response_id,
        wai.wai_total,
        wai_subscales.wai_goal,
        wai_subscales.wai_task,
        wai_subscales.wai_bond,
        params.alliance_instrument,
        case when params.alliance_instrument = 'WAI-SR' then wai.wai_total else srs.srs_total end
            as alliance_total,
        case when params.alliance_instrument = 'WAI-SR' then wai.wai_response_id
            else srs.srs_response_id end as alliance_response_id
    from attended_sessions
    cross join params
    left join srs on attended_sessions.session_id = srs.session_id
    left join wai on attended_sessions.session_id = wai.session_id
    left join wai_subscales on wai.wai_response_id = wai_subscales.wai_response_id
),

with_changes as (
    select
        *,
        avg(alliance_total) over (partition by patient_id) as patient_mean_alliance,
        count(alliance_total) over (partition by episode_id order by session_number) as alliance_score_number,
        lag(alliance_total ignore nulls) over (partition by episode_id order by session_number)
            as previous_alliance_total
    from joined
),

changes as (
    select
        *,
        alliance_total - patient_mean_alliance as alliance_deviation,
        case when alliance_total is not null then alliance_total - previous_alliance_total end
            as alliance_change
    from with_changes
),

change_spread as (
    -- rule A needs the patient's own spread without the change under test: keep the sums
    select
        *,
        count(alliance_change) over (partition by episode_id) as episode_changes_n,
        sum(alliance_change) over (partition by episode_id) as episode_changes_sum,
        sum(alliance_change ^ 2) over (partition by episode_id) as episode_changes_sumsq,
        stddev_samp(alliance_change) over (partition by clinic_id) as clinic_change_sd
    from changes
),

leave_one_out as (
    select
        *,
        case when alliance_change is not null and episode_changes_n >= 3 then sqrt(greatest(0,
            ((episode_changes_sumsq - alliance_change ^ 2)
             - (episode_changes_sum - alliance_change) ^ 2 / (episode_changes_n - 1))
            / (episode_changes_n - 2)))
        end as own_change_sd_excluding
    from change_spread
),

rules as (
    select
        leave_one_out.*,
        coalesce(
            -leave_one_out.alliance_change >= params.min_drop
            and leave_one_out.episode_changes_n >= params.min_changes_own
            and -leave_one_out.alliance_change >= params.k_own * leave_one_out.own_change_sd_excluding,
            false) as rupture_rule_a,
        coalesce(
            -leave_one_out.alliance_change >= params.min_drop
            and -leave_one_out.alliance_change >= params.k_clinic * leave_one_out.clinic_change_sd,
            false) as rupture_rule_b,
        params.rupture_rule,
        params.repair_window
    from leave_one_out
    cross join params
),

candidates as (
    select
        *,
        case rupture_rule
            when 'a' then rupture_rule_a
            when 'b' then rupture_rule_b
            when 'both' then rupture_rule_a and rupture_rule_b
            else rupture_rule_a or rupture_rule_b
        end as is_candidate_rupture
    from rules
),

repairs as (
    -- back at (or above) the pre-drop score at one of the next repair_window attended sessions
    select
        ruptures.session_id,
        min(later.session_number) as repair_session_number
    from candidates as ruptures
    inner join candidates as later
        on later.episode_id = ruptures.episode_id
        and later.session_number > ruptures.session_number
        and later.session_number <= ruptures.session_number + ruptures.repair_window
        and later.alliance_total >= ruptures.previous_alliance_total
    where ruptures.is_candidate_rupture
    group by ruptures.session_id
),

episode_progress as (
    -- whether a rupture's repair window can still see sessions: the episode is open, fewer than
    -- repair_window attended sessions followed the rupture, and the patient still comes (the
    -- last attended session within pending_max_days of the clinic's latest one: clinics rarely
    -- send episode.closed for a patient who stops coming, and such a rupture stayed pending for
    -- ever, leaving the repair rate, which it would lower, for good)
    select
        episodes.episode_id,
        episodes.is_closed,
        max(attended_sessions.session_number) as last_session_number,
        max(attended_sessions.session_at) as last_session_at
    from core.episodes as episodes
    left join attended_sessions on attended_sessions.episode_id = episodes.episode_id
    group by episodes.episode_id, episodes.is_closed
),

data_now as (
    -- each clinic's own "now" (its latest attended session; an as-of rebuild sees its own), not
    -- the clock, so a rebuild of the same data gives the same statuses; per clinic, so a clinic
    -- whose export lags does not see its patients as stopped while other clinics' data runs on
    select clinic_id, max(session_at) as latest_session_at from attended_sessions group by clinic_id
),

final as (
    select
        ---------- ids
        candidates.session_id,
        candidates.episode_id,
        candidates.patient_id,
        candidates.therapist_id,
        candidates.clinic_id,
        candidates.session_number,
        candidates.session_at,
        candidates.session_month,
        ---------- scores
        candidates.srs_response_id,
        candidates.srs_total,
        candidates.srs_concern,
        candidates.wai_response_id,
        candidates.wai_total,
        candidates.wai_goal,
        candidates.wai_task,
        candidates.wai_bond,
        candidates.alliance_instrument,
        candidates.alliance_response_id,
        candidates.alliance_total,
        case when candidates.alliance_total is not null then candidates.alliance_score_number end
            as alliance_score_number,
        candidates.patient_mean_alliance,
        candidates.alliance_deviation,
        ---------- change and ruptures
        candidates.previous_alliance_total,
        candidates.alliance_change,
        candidates.own_change_sd_excluding,
        candidates.clinic_change_sd,
        candidates.rupture_rule_a,
        candidates.rupture_rule_b,
        candidates.is_candidate_rupture,
        -- (from repair_status below, in the select after final)
        null::boolean as is_repaired,
        case when not candidates.is_candidate_rupture then null
            when repairs.repair_session_number is not null then 'repaired'
            when not coalesce(episode_progress.is_closed, false)
                and episode_progress.last_session_number
                    < candidates.session_number + candidates.repair_window
                and episode_progress.last_session_at
                    >= data_now.latest_session_at - to_days(params.pending_max_days::integer)
                then 'pending'
            else 'unrepaired' end as repair_status,
        repairs.repair_session_number
    from candidates
    left join repairs on candidates.session_id = repairs.session_id
    left join episode_progress on episode_progress.episode_id = candidates.episode_id
    left join data_now on data_now.clinic_id = candidates.clinic_id
    cross join params
)

-- is_repaired: NULL while pending (a pending rupture counted as unrepaired biased every recent
-- repair rate low); a closed episode's unrepaired rupture is final
select * replace (
    case repair_status when 'repaired' then true when 'unrepaired' then false end as is_repaired)
from final
