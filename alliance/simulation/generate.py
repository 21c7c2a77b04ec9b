"""The clinic simulator's generator: patients in arrival order, streamed into daily export files."""

from __future__ import annotations

import json
import math
import random
from datetime import date, timedelta
from statistics import NormalDist
from typing import Any

import numpy as np

from alliance.simulation.model import (
    AGE_GROUPS,
    DET_DEPTH_POINTS,
    DET_DROPOUT_HAZARD,
    DET_RUPTURE_SHIFT,
    DET_WORSENING,
    IMPROVE_PER_INTAKE,
    IMPROVE_SHIFT,
    MODALITIES,
    ORS_AT_PHQ0,
    R_AT_ZERO,
    REFERRALS,
    SLOPE,
    SRS_GAP_MEDIAN,
    SRS_GAP_NARROWING,
    SRS_GAP_SIGMA,
    SRS_LEVEL_MAX,
    SRS_LEVEL_MIN,
    TOTAL_RANGE,
    IdMaker,
    SimParams,
    _pick,
    add_months,
    latent_pairs,
    split_decimal,
    split_integer,
    tang_derubeis,
)
from alliance.simulation.writer import DayWriter

DAY = 1440  # minutes
CHUNK = 100  # patients per latent draw (exact correlation within each block of arrivals)
BAD_KINDS = ("malformed_json", "unknown_event_type", "missing_field", "wrong_type",
             "answer_out_of_range", "exact_duplicate", "conflicting_duplicate")
EXPECTED_REASON = {
    "malformed_json": "malformed_json",
    "unknown_event_type": "unknown_event_type",
    "missing_field": "missing_field",
    "wrong_type": "wrong_type",
    "answer_out_of_range": "answer_out_of_range",
    "exact_duplicate": "duplicate",  # skipped and counted, not quarantined
    "conflicting_duplicate": "conflicting_duplicate",
}
OUT_OF_RANGE = {"PHQ-9": 7, "GAD-7": 7, "WAI-SR": 9, "SRS": 12.5, "ORS": 12.5}
# Attended sessions after a rupture within which it counts as repaired (back at the pre-dip total):
# the marts' default rupture_repair_window (dbt_like_sql/parameters.yml).
REPAIR_WINDOW = 3
# ... and the days after an open episode's last attended session for which its rupture can still
# be pending (rupture_pending_max_days; measured here from the simulated window's end)
PENDING_MAX_DAYS = 42
GAIN_CHECK_CUTOFF = 6  # PHQ-9 reliable change (NHS Talking Therapies): the loosest common cutoff


def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class Ev:
    """One valid event of the patient being generated, before it is serialised."""

    __slots__ = ("day", "fday", "d", "protected", "erroneous")

    def __init__(self, day: int, fday: int, d: dict[str, Any], protected: bool) -> None:
        self.day = day
        self.fday = fday
        self.d = d
        self.protected = protected
        self.erroneous = False


class _Zigzag:
    """Session noise whose sign mostly alternates, with bounded amplitude.

    Session-to-session changes then have light tails: a drop of 2 SD of a patient's own changes
    almost never happens by noise alone, so rupture rules flag injected dips, not noise.
    """

    __slots__ = ("rng", "sign", "lo", "hi", "flip")

    def __init__(self, rng: random.Random, lo: float, hi: float, flip: float = 0.85) -> None:
        self.rng, self.lo, self.hi, self.flip = rng, lo, hi, flip
        self.sign = 1.0 if rng.random() < 0.5 else -1.0

    def __call__(self) -> float:
        if self.rng.random() < self.flip:
            self.sign = -self.sign
        return self.sign * self.rng.uniform(self.lo, self.hi)


class Simulator:
    """Generates the whole network; `run(writer)` streams lines, `truth` collects the ground truth."""

    def __init__(self, p: SimParams) -> None:
        self.p = p
        self.rng = random.Random(p.seed)
        self.np_rng = np.random.default_rng(p.seed)
        self.ids = IdMaker(p.seed)
        self.end_date = add_months(p.start, p.months)
        self.n_days = (self.end_date - p.start).days
        self.end_min = self.n_days * DAY
        self.day_str = [(p.start + timedelta(days=d)).isoformat() for d in range(self.n_days + 40)]
        self.tod = [f"{m // 60:02d}:{m % 60:02d}:00" for m in range(DAY)]
        self.weekday0 = p.start.weekday()
        self.rho = _clamp((p.alliance_outcome_r - R_AT_ZERO) / SLOPE, -0.95, 0.95)
        # G is standard normal: episodes below this quantile deteriorate
        self.det_q = NormalDist().inv_cdf(p.deterioration_share) if p.deterioration_share > 0 \
            else -math.inf
        self.truth: dict[str, Any] = {
            "ruptures": [], "sudden_gains": [], "bad_records": [], "amendments": [],
            "retractions": [], "wrong_totals": [], "event_types": {},
        }
        self.file_stats: dict[int, dict[str, int]] = {}
        self.n_valid = 0
        self.n_episodes = 0
        self.bad_p = p.bad_share / (1 - p.bad_share) if p.bad_share < 1 else 1.0

    # ---------------------------------------------------------------- time
    def ts(self, t: int) -> str:
        return f"{self.day_str[t // DAY]}T{self.tod[t % DAY]}{self.offset}"

    def weekday_from(self, day: int) -> int:
        while (self.weekday0 + day) % 7 >= 5:
            day += 1
        return day

    # ---------------------------------------------------------------- emit
    def emit(self, t: int, etype: str, sid: str | None, payload: dict[str, Any], *,
             therapist: bool = True, protected: bool = False) -> Ev | None:
        if t >= self.end_min:
            return None
        d: dict[str, Any] = {
            "event_id": self.ids(), "event_type": etype, "schema_version": 1,
            "occurred_at": self.ts(t), "source": "simulator", "clinic_id": self.clinic_id,
            "patient_id": self.pid,
        }
        if therapist:
            d["therapist_id"] = self.thid
        d["episode_id"] = self.epi
        if sid is not None:
            d["session_id"] = sid
        d["payload"] = payload
        day = t // DAY
        fday = day
        if not protected and self.rng.random() < self.p.late_share:
            # the last export of the window carries everything still pending
            fday = min(day + self.rng.randint(1, 10), max(day, self.n_days - 1))
        ev = Ev(day, fday, d, protected)
        self.evs.append(ev)
        return ev

    def questionnaire(self, t: int, sid: str, instrument: str, timing: str, answers: list[Any],
                      protected: bool) -> Ev | None:
        if not protected and self.rng.random() < self.p.missing_item_share:
            answers = list(answers)
            answers[self.rng.randrange(len(answers))] = None
        payload = {
            "instrument": instrument, "instrument_version": "1", "respondent": "patient",
            "administered_at": self.ts(t), "timing": timing,
            "answers": {str(i + 1): v for i, v in enumerate(answers)},
        }
        ev = self.emit(t, "questionnaire.submitted", sid, payload, protected=protected)
        if ev is not None:
            self.qevs.append(ev)
        return ev

    # ---------------------------------------------------------------- run
    def run(self, writer: DayWriter | None, max_patients: int | None = None) -> None:
        p = self.p
        n_pat = p.patients if max_patients is None else max_patients
        nr = self.np_rng
        t_alliance = nr.standard_normal((p.clinics, p.therapists_per_clinic))
        t_outcome = nr.standard_normal((p.clinics, p.therapists_per_clinic))
        last_intake = max(1, self.n_days - 14)
        arrivals = np.sort(nr.integers(0, last_intake, n_pat))
        weights = np.array([0.8 + 0.4 * ((c * 7919) % 11) / 10 for c in range(p.clinics)])
        clinic_of = nr.choice(p.clinics, size=n_pat, p=weights / weights.sum())
        therapist_of = nr.integers(0, p.therapists_per_clinic, n_pat)
        seq = [0] * p.clinics
        for c0 in range(0, n_pat, CHUNK):
            c1 = min(n_pat, c0 + CHUNK)
            cl, th = clinic_of[c0:c1], therapist_of[c0:c1]
            ta, tg = t_alliance[cl, th], t_outcome[cl, th]
            a1, g1 = latent_pairs(c1 - c0, self.rho, ta, tg, p.therapist_alliance_share,
                                  p.therapist_outcome_share, nr)
            a2, g2 = latent_pairs(c1 - c0, self.rho, ta, tg, p.therapist_alliance_share,
                                  p.therapist_outcome_share, nr)
            for j in range(c1 - c0):
                i = c0 + j
                c = int(cl[j])
                seq[c] += 1
                arrival = self.weekday_from(int(arrivals[i]))
                if writer is not None:
                    writer.flush_before(int(arrivals[i]))
                self.patient(c, int(th[j]), seq[c], arrival,
                             (float(a1[j]), float(g1[j])), (float(a2[j]), float(g2[j])))
                if writer is not None:
                    self.place(writer)
                else:
                    self.n_valid += sum(1 for e in self.evs if e.fday < self.n_days)

    # ---------------------------------------------------------------- patient
    def patient(self, c: int, th: int, n: int, arrival: int,
                lat1: tuple[float, float], lat2: tuple[float, float]) -> None:
        R, p = self.rng, self.p
        self.clinic_id = f"clinic-{c + 1:02d}"
        self.offset = p.utc_offsets[c % len(p.utc_offsets)]
        code = f"C{c + 1:02d}-{n:06d}"
        self.code = code
        self.pid = f"PAT-{code}"
        self.thid = f"THR-C{c + 1:02d}-{th + 1:02d}"
        self.evs: list[Ev] = []
        self.qevs: list[Ev] = []
        t0 = arrival * DAY + R.randint(8 * 60, 16 * 60)
        reason, t_close = self.episode(1, t0, *lat1)
        if (reason == "planned" and t_close is not None
                and R.random() < p.second_episode_share):
            day = self.weekday_from(t_close // DAY + R.randint(60, 180))
            t1 = day * DAY + R.randint(8 * 60, 16 * 60)
            if t1 < self.end_min:
                self.episode(2, t1, *lat2)
        self.corrections()

    # ---------------------------------------------------------------- episode
    def episode(self, ep_no: int, t0: int, A: float, G: float) -> tuple[str | None, int | None]:
        R, p = self.rng, self.p
        self.epi = f"EPI-{self.code}-{ep_no}"
        self.n_episodes += 1
        opened = self.emit(t0, "episode.opened", None,
                           {"age_group": _pick(R, AGE_GROUPS),
                            "referral_source": _pick(R, REFERRALS)}, therapist=False)
        if opened is None:
            return None, None
        t_assign = t0 + R.randint(0, 3) * DAY + R.randint(0, 120)
        self.emit(t_assign, "therapist.assigned", None, {"role": "primary"})
        n_planned = int(_clamp(round(math.exp(R.gauss(math.log(9), 0.4))), 4, 20))

        # Alliance plan first: an unrepaired rupture makes deterioration likelier below.
        wai_base = _clamp(3.7 + 0.55 * A + R.gauss(0, 0.15), 1.3, 4.9)
        rupt_k = None
        repaired_plan = True
        if n_planned >= 8 and R.random() < p.rupture_share:
            # from session 5 on, so rule A has 3+ of the patient's own changes to compare with
            rupt_k = R.randint(5, n_planned - 3)
            repaired_plan = R.random() < p.rupture_repair_share * (1.2 if A > 0 else 0.8)
            repair_r = R.randint(1, 3)
            damp = R.uniform(0.5, 0.8)
        # SRS: 40 minus a log-normal distance from the ceiling (smaller with higher A) that narrows
        # a little over the sessions: left-skewed totals with a ceiling effect (Duncan et al. 2003).
        srs_gap = SRS_GAP_MEDIAN * math.exp(-SRS_GAP_SIGMA * A)

        # Outcome: intake PHQ-9, improvement by the end of planned treatment (linked to G), or for
        # a minority a gradual worsening (deteriorators: likelier with low G, poor alliance or an
        # unrepaired rupture; Lambert 2013).
        p0 = _clamp(R.gauss(16.0, 4.5), 5.0, 27.0)
        improve = IMPROVE_PER_INTAKE * p0 + 4.0 * G + IMPROVE_SHIFT
        # Deteriorators are the low tail of the outcome latent G (no extra random draw, so the
        # calibrated alliance-outcome r stays as stable across seeds as before, and alliance links
        # to deterioration only through rho and ruptures); the deeper in the tail, the larger the
        # worsening.
        score = G
        if rupt_k is not None and not repaired_plan:
            score -= DET_RUPTURE_SHIFT
        worsen = 0.0
        if score < self.det_q:
            worsen = min(DET_WORSENING[1], DET_WORSENING[0] + DET_DEPTH_POINTS * (self.det_q - score))
        worsen_rate = min(worsen / max(1, n_planned - 1), 2.0)
        lam = 0.45  # negatively accelerated: most change comes early (Howard et al. 1986)
        norm = 1 - math.exp(-lam * (n_planned - 1))
        gain_n = None
        # (only with PHQ-9 at every session: a gain is a drop between consecutive sessions
        # (Tang & DeRubeis 1999), and with a longer interval no two measurements are; the
        # injected drop went unrecorded in the ground truth)
        if (p.outcome_interval == 1 and not worsen and improve >= 9 and p0 >= 13.5
                and n_planned >= 6 and R.random() < p.sudden_gain_share):
            gain_n = R.randint(2, min(5, n_planned - 3))
            step = max(8.0, 0.7 * improve)
        gad0 = _clamp(0.72 * p0 * 21 / 27 + R.gauss(1.5, 2.5), 2.0, 21.0)
        ors_offset = R.gauss(0, 2.0)

        def phq_level(s: int) -> float:
            if worsen:
                # gradual (at most 2 points a session), so no sudden loss appears by construction
                return _clamp(p0 + worsen_rate * (min(s, n_planned) - 1), 0.0, 27.0)
            if gain_n is None:
                h = (1 - math.exp(-lam * (min(s, n_planned) - 1))) / norm
                return _clamp(p0 - improve * h, 0.0, 27.0)
            pre = p0 - 0.25 * (min(s, gain_n) - 1)
            if s <= gain_n:
                return pre
            rest = improve - step - 0.25 * (gain_n - 1)
            frac = min(1.0, (s - gain_n - 1) / max(1, n_planned - gain_n - 1))
            return _clamp(pre - step - rest * frac, 0.0, 27.0)

        srs_noise = _Zigzag(R, 0.35, 0.9, 0.9)
        phq_noise = _Zigzag(R, 0.3, 1.0)
        ors_noise = _Zigzag(R, 0.3, 1.0)
        protect_srs = set(range(rupt_k - 1, rupt_k + 4)) if rupt_k else set()
        protect_phq = set(range(gain_n - 2, gain_n + 4)) if gain_n else set()
        srs_obs: dict[int, float] = {}
        srs_ev: dict[int, Ev] = {}
        phq_obs: dict[int, int] = {}
        phq_ev: dict[int, Ev] = {}
        rupture_delta = 0.0

        p_noshow = _clamp(R.gauss(0.06, 0.03), 0.01, 0.25)
        p_cancel = _clamp(R.gauss(0.08, 0.03), 0.01, 0.25)
        modality = _pick(R, MODALITIES)
        day = self.weekday_from(t_assign // DAY + R.randint(4, 14))
        slot = R.randint(8, 17) * 60 + R.choice((0, 30))
        t_app = day * DAY + slot
        t_book = t_assign + 30
        s = 0
        a = 0
        last_attended = 0
        misses = 0
        reason: str | None = None
        t_close = 0
        while t_app < self.end_min:
            a += 1
            sid = f"SES-{self.code}-{ep_no}-{a:02d}"
            mod = modality if R.random() < 0.85 else _pick(R, MODALITIES)
            self.emit(t_book, "session.scheduled", sid,
                      {"scheduled_for": self.ts(t_app), "modality": mod})
            x = R.random()
            attended = False
            dur = 0
            if x < p_cancel:
                t_c = max(t_book + 1, t_app - R.randint(120, 4320))
                by = "patient" if R.random() < 0.75 else ("therapist" if R.random() < 0.6 else "clinic")
                self.emit(t_c, "session.cancelled", sid,
                          {"cancelled_by": by, "late": (t_app - t_c) < DAY})
                misses += 1
            elif x < p_cancel + p_noshow:
                self.emit(t_app + 15, "session.no_show", sid, {})
                misses += 1
            else:
                attended = True
                misses = 0
                s += 1
                last_attended = t_app
                dur = R.choice((45, 50, 50, 50, 55, 60))
                # ---- outcome questionnaires before the session
                level = phq_level(s)
                ors_total = _clamp(ORS_AT_PHQ0 - 1.15 * level + ors_offset + ors_noise(), 0.4, 39.6)
                if R.random() >= p.missing_questionnaire_share:
                    self.questionnaire(t_app - 10, sid, "ORS", "pre_session",
                                       split_decimal(ors_total, 4, R), False)
                if (s - 1) % p.outcome_interval == 0:
                    timing = "intake" if s == 1 else "pre_session"
                    obs = int(round(_clamp(level + phq_noise(), 0, 27)))
                    if gain_n is not None and s == gain_n + 1 and gain_n in phq_obs:
                        obs = min(obs, phq_obs[gain_n] - 7)
                    prot = s in protect_phq
                    if prot or R.random() >= p.missing_questionnaire_share:
                        ev = self.questionnaire(t_app - 8, sid, "PHQ-9", timing,
                                                split_integer(obs, 9, 0, 3, R), prot)
                        if ev is not None:
                            phq_obs[s], phq_ev[s] = obs, ev
                    if prot or R.random() >= p.missing_questionnaire_share:
                        if level > p0:  # worsening: anxiety rises with depression (21/27 scale)
                            g = gad0 + (level - p0) * 0.7
                        else:
                            g = gad0 - (p0 - level) * (gad0 / p0) * 0.9
                        gobs = int(round(_clamp(g + R.uniform(-1, 1), 0, 21)))
                        self.questionnaire(t_app - 7, sid, "GAD-7", timing,
                                           split_integer(gobs, 7, 0, 3, R), False)
                self.emit(t_app, "session.attended", sid,
                          {"duration_minutes": dur, "modality": mod})
                # ---- alliance after the session
                level_a = _clamp(40.0 - srs_gap * (1 - min(SRS_GAP_NARROWING * (s - 1), 0.2)),
                                 SRS_LEVEL_MIN, SRS_LEVEL_MAX)
                noise = srs_noise()
                total = level_a + noise
                pre = srs_obs.get(s - 1)
                repair_floor = None
                if rupt_k is not None and pre is not None:
                    if s == rupt_k:
                        rupture_delta = min(R.uniform(10, 14), pre - 1.0)
                        if rupture_delta < 8:
                            rupt_k = None  # too little room below a very low alliance
                        else:
                            total = pre - rupture_delta
                    elif rupt_k < s:
                        pre_k = srs_obs.get(rupt_k - 1, pre)
                        dip = srs_obs.get(rupt_k, pre_k - rupture_delta)
                        j = s - rupt_k
                        if repaired_plan and j < repair_r:
                            total = dip + (pre_k - dip) * (j / repair_r) * R.uniform(0.6, 0.85)
                        elif repaired_plan and j == repair_r:
                            total = max(total, pre_k + R.uniform(0.2, 0.8))
                            repair_floor = pre_k
                        elif not repaired_plan:
                            total = level_a - rupture_delta * damp + noise
                            if j <= 3:
                                total = min(total, pre_k - 1.5)
                total = _clamp(total, 0.4, 39.6)
                items = split_decimal(total, 4, R)
                while repair_floor is not None and round(sum(items), 1) < repair_floor:
                    # (the items' rounding under the ceiling left a planned repair 0.1 short of
                    # a pre-dip total of 39.6, and the ground truth called it unrepaired)
                    k = items.index(min(items))
                    items[k] = round(items[k] + 0.1, 1)
                prot = s in protect_srs
                if prot or R.random() >= p.missing_questionnaire_share:
                    ev = self.questionnaire(t_app + dur + 2, sid, "SRS", "post_session", items, prot)
                    if ev is not None:
                        srs_obs[s] = round(sum(items), 1)
                        srs_ev[s] = ev
                if s >= 3 and (s - 3) % p.wai_interval == 0:
                    shift = (total - level_a) / 10.0
                    m = _clamp(wai_base + shift, 1.0, 5.0)
                    wai = [int(_clamp(round(m + R.gauss(0, 0.45)), 1, 5)) for _ in range(12)]
                    if R.random() >= p.missing_questionnaire_share:
                        self.questionnaire(t_app + dur + 4, sid, "WAI-SR", "post_session", wai, False)
            # ---- endings
            if attended and s >= n_planned:
                reason, t_close = "planned", t_app + R.randint(1, 10) * DAY + R.randint(0, 240)
                break
            if misses >= 3:
                reason, t_close = "dropout", t_app + R.randint(14, 35) * DAY
                break
            if attended:
                hazard = p.dropout_hazard * math.exp(-0.5 * A)
                if worsen and level >= p0 + 3:
                    hazard += DET_DROPOUT_HAZARD  # patients getting worse leave more often
                if (rupt_k is not None and not repaired_plan and rupt_k <= s <= rupt_k + 2):
                    hazard += 0.3
                if R.random() < hazard:
                    if R.random() < 0.5:
                        a += 1
                        sid = f"SES-{self.code}-{ep_no}-{a:02d}"
                        t_next = t_app + 7 * DAY
                        self.emit(t_app + dur + 5, "session.scheduled", sid,
                                  {"scheduled_for": self.ts(t_next), "modality": mod})
                        self.emit(t_next + 15, "session.no_show", sid, {})
                    reason, t_close = "dropout", t_app + R.randint(21, 35) * DAY
                    break
            x = R.random()
            if x < 0.004:
                reason, t_close = "transferred", t_app + R.randint(1, 14) * DAY
                break
            if x < 0.007:
                reason, t_close = "other", t_app + R.randint(1, 14) * DAY
                break
            t_book = t_app + dur + 5
            t_app += (7 if R.random() < 0.9 else 14) * DAY
        if reason is not None:
            closed = self.emit(t_close, "episode.closed", None, {"reason": reason})
            if closed is None:
                reason = None
        self.clean_spurious_gains(phq_obs, phq_ev, gain_n)
        self.record_truth(rupt_k, srs_obs, srs_ev, gain_n, phq_obs, phq_ev,
                          attended=s, closed=reason is not None,
                          still_coming=last_attended >= self.end_min - PENDING_MAX_DAYS * DAY)
        return reason, (t_close if reason is not None else None)

    # ---------------------------------------------------------------- truth helpers
    def clean_spurious_gains(self, obs: dict[int, int], evs: dict[int, Ev], gain_n: int | None) -> None:
        """Soften natural PHQ-9 drops that would pass the sudden-gain criteria by chance."""
        for _ in range(6):
            changed = False
            for n in sorted(obs):
                if n == gain_n or n < 2 or not tang_derubeis(obs, n, GAIN_CHECK_CUTOFF):
                    continue
                new = obs[n] - (GAIN_CHECK_CUTOFF - 1)
                obs[n + 1] = new
                ans = evs[n + 1].d["payload"]["answers"]
                items = split_integer(new, 9, 0, 3, self.rng)
                for i, k in enumerate(ans):
                    if ans[k] is not None:
                        ans[k] = items[i]
                changed = True
            if not changed:
                break

    def record_truth(self, rupt_k: int | None, srs_obs: dict[int, float], srs_ev: dict[int, Ev],
                     gain_n: int | None, phq_obs: dict[int, int], phq_ev: dict[int, Ev], *,
                     attended: int, closed: bool, still_coming: bool) -> None:
        base = {"clinic_id": self.clinic_id, "patient_id": self.pid, "episode_id": self.epi}
        if rupt_k is not None and rupt_k in srs_obs and rupt_k - 1 in srs_obs:
            pre = srs_obs[rupt_k - 1]
            after = [s for s in range(rupt_k + 1, rupt_k + REPAIR_WINDOW + 1) if s in srs_obs]
            repair_at = next((s for s in after if srs_obs[s] >= pre), None)
            dip_ev = srs_ev[rupt_k]
            self.truth["ruptures"].append({
                **base, "session_id": dip_ev.d["session_id"], "session_number": rupt_k,
                "srs_event_id": dip_ev.d["event_id"], "pre_total": pre,
                "dip_total": srs_obs[rupt_k], "drop": round(pre - srs_obs[rupt_k], 1),
                # None: pending (the episode is still open, the patient still comes and fewer
                # than 3 attended sessions followed, so no repair is known yet); else False
                "repaired": True if repair_at is not None else (
                    None if not closed and still_coming and attended < rupt_k + REPAIR_WINDOW
                    else False),
                "repair_session_number": repair_at,
                "sessions_observed_after": len(after),
            })
        if gain_n is not None and tang_derubeis(phq_obs, gain_n, 7):
            self.truth["sudden_gains"].append({
                **base, "instrument": "PHQ-9", "pregain_session_number": gain_n,
                "pregain_session_id": phq_ev[gain_n].d["session_id"],
                "postgain_session_id": phq_ev[gain_n + 1].d["session_id"],
                "pregain_event_id": phq_ev[gain_n].d["event_id"],
                "postgain_event_id": phq_ev[gain_n + 1].d["event_id"],
                "pregain_score": phq_obs[gain_n], "postgain_score": phq_obs[gain_n + 1],
                "gain": phq_obs[gain_n] - phq_obs[gain_n + 1],
            })

    # ---------------------------------------------------------------- corrections, totals, notes
    def corrections(self) -> None:
        """Amendments, retractions, reported totals and free text for the current patient."""
        R, p = self.rng, self.p
        for ev in list(self.qevs):
            pl = ev.d["payload"]
            answers = pl["answers"]
            if ev.protected or any(v is None for v in answers.values()):
                continue
            x = R.random()
            if x < p.amend_share:
                # The original carried a typo; the amendment carries the full corrected response.
                corrected = {k: v for k, v in pl.items()}
                corrected["answers"] = dict(answers)
                key = R.choice(list(answers))
                v = answers[key]
                typo = self._typo(pl["instrument"], v)
                if typo == v:
                    continue
                answers[key] = typo
                ev.erroneous = True
                corrected["amends_event_id"] = ev.d["event_id"]
                t = self._minutes(ev.d["occurred_at"]) + R.randint(1, 20) * DAY
                am = self.emit(t, "questionnaire.amended", ev.d.get("session_id"), corrected,
                               protected=True)
                if am is None:
                    answers[key] = v  # no correction within the window: keep the true answer
                    continue
                self._same_stream(am, ev)
                am.fday = max(am.fday, min(ev.fday + 1, self.n_days - 1))
                self.truth["amendments"].append({"event_id": am.d["event_id"],
                                                  "amends_event_id": ev.d["event_id"]})
            elif x < p.amend_share + p.retract_share:
                # An extra response entered in error, then retracted.
                wrong = {k: v for k, v in pl.items()}
                wrong["answers"] = {k: self._typo(pl["instrument"], v) for k, v in answers.items()}
                t = self._minutes(ev.d["occurred_at"]) + 3
                err = self.emit(t, "questionnaire.submitted", ev.d.get("session_id"), wrong,
                                protected=True)
                if err is None:
                    continue
                self._same_stream(err, ev)
                err.erroneous = True
                err.fday = max(err.day, ev.fday)
                tr = self.emit(t + R.randint(1, 14) * DAY, "questionnaire.retracted", None,
                               {"retracts_event_id": err.d["event_id"], "reason": "entered_in_error"},
                               therapist=False, protected=True)
                if tr is None:
                    continue
                self._same_stream(tr, ev)
                tr.fday = max(tr.fday, min(err.fday + 1, self.n_days - 1))
                self.truth["retractions"].append({"event_id": tr.d["event_id"],
                                                   "retracts_event_id": err.d["event_id"]})
        for ev in self.qevs:
            pl = ev.d["payload"]
            if ev.erroneous or any(v is None for v in pl["answers"].values()):
                continue
            if R.random() < p.reported_total_share:
                total = sum(pl["answers"].values())
                total = round(total, 1) if isinstance(total, float) else total
                if R.random() < p.wrong_total_share:
                    lo, hi = TOTAL_RANGE[pl["instrument"]]
                    delta = R.choice((-3, -2, 2, 3))
                    if not lo <= total + delta <= hi:
                        delta = -delta
                    total = total + delta
                    total = round(total, 1) if isinstance(total, float) else total
                    self.truth["wrong_totals"].append(ev.d["event_id"])
                pl["total"] = total
        for ev in self.evs:
            if (ev.d["event_type"] in ("session.attended", "questionnaire.submitted")
                    and R.random() < p.free_text_share):
                ev.d["payload"]["clinician_note"] = f"synthetic note {R.randint(1000, 9999)}"

    @staticmethod
    def _same_stream(new: Ev, orig: Ev) -> None:
        # corrections run after all episodes: take the episode and therapist of the original
        for k in ("therapist_id", "episode_id"):
            if k in new.d and k in orig.d:
                new.d[k] = orig.d[k]

    def _typo(self, instrument: str, v: Any) -> Any:
        R = self.rng
        if instrument in ("SRS", "ORS"):
            return round(_clamp(v + R.choice((-3.0, -2.0, 2.0, 3.0)), 0.0, 10.0), 1)
        hi, lo = (5, 1) if instrument == "WAI-SR" else (3, 0)
        return int(_clamp(v + R.choice((-2, -1, 1, 2)), lo, hi))

    def _minutes(self, ts: str) -> int:
        day = (date.fromisoformat(ts[:10]) - self.p.start).days
        return day * DAY + int(ts[11:13]) * 60 + int(ts[14:16])

    # ---------------------------------------------------------------- placing lines
    def place(self, writer: DayWriter) -> None:
        """Serialise the patient's events into their export days, with bad records mixed in."""
        R = self.rng
        types = self.truth["event_types"]
        for ev in self.evs:
            d = ev.d
            line = _dumps(d)
            fname_day = ev.fday
            writer.append(fname_day, line)
            st = self.file_stats.setdefault(fname_day, {"valid": 0, "duplicates": 0,
                                                         "quarantined": 0, "dropped_fields": 0})
            st["valid"] += 1
            if "clinician_note" in d["payload"]:
                st["dropped_fields"] += 1
            types[d["event_type"]] = types.get(d["event_type"], 0) + 1
            self.n_valid += 1
            if self.bad_p and R.random() < self.bad_p:
                self.bad(writer, ev, line)

    def bad(self, writer: DayWriter, ev: Ev, line: str) -> None:
        R = self.rng
        d = ev.d
        etype = d["event_type"]
        kinds = ["malformed_json", "unknown_event_type", "missing_field", "wrong_type",
                 "exact_duplicate"]
        inst = d["payload"].get("instrument") if etype == "questionnaire.submitted" else None
        if inst in OUT_OF_RANGE:
            kinds.append("answer_out_of_range")
        if etype in ("session.attended", "questionnaire.submitted") and not ev.erroneous:
            kinds.append("conflicting_duplicate")
        kind = R.choice(kinds)
        clean = {k: v for k, v in d.items()}
        clean["payload"] = {k: v for k, v in d["payload"].items() if k != "clinician_note"}
        fld = None
        event_id: str | None = None
        day = ev.fday
        if kind in ("exact_duplicate", "conflicting_duplicate"):
            day = min(self.n_days - 1, ev.fday + R.randint(0, 3))
            event_id = d["event_id"]
            if kind == "exact_duplicate":
                bad_line = line
            else:
                pl = dict(clean["payload"])
                if etype == "session.attended":
                    pl["duration_minutes"] = pl["duration_minutes"] + 10
                else:
                    ans = dict(pl["answers"])
                    key = R.choice(list(ans))
                    v = ans[key]
                    new = self._typo(inst, v if v is not None else (5.0 if inst in ("SRS", "ORS") else 1))
                    ans[key] = new if new != v else (None if v is not None else 1)
                    pl["answers"] = ans
                    pl.pop("total", None)
                clean["payload"] = pl
                bad_line = _dumps(clean)
        else:
            clean["event_id"] = event_id = self.ids()
            if kind == "malformed_json":
                full = _dumps(clean)
                bad_line = full[: int(len(full) * R.uniform(0.2, 0.8))]
            elif kind == "unknown_event_type":
                clean["event_type"] = R.choice(("session.rescheduled", "note.added"))
                bad_line = _dumps(clean)
            elif kind == "missing_field":
                fld = R.choice(("occurred_at", "source", "payload"))
                del clean[fld]
                bad_line = _dumps(clean)
            elif kind == "wrong_type":
                fld = "schema_version"
                clean["schema_version"] = "one"
                bad_line = _dumps(clean)
            else:  # answer_out_of_range
                ans = dict(clean["payload"]["answers"])
                fld = R.choice(list(ans))
                ans[fld] = OUT_OF_RANGE[inst]
                clean["payload"]["answers"] = ans
                clean["payload"].pop("total", None)
                fld = f"payload.answers.{fld}"
                bad_line = _dumps(clean)
        n = writer.append(day, bad_line)
        st = self.file_stats.setdefault(day, {"valid": 0, "duplicates": 0, "quarantined": 0,
                                              "dropped_fields": 0})
        if kind == "exact_duplicate":
            st["duplicates"] += 1
        else:
            st["quarantined"] += 1
        self.truth["bad_records"].append({
            "file": writer.file_name(day), "line": n, "kind": kind,
            "expected_reason": EXPECTED_REASON[kind], "event_id": event_id, "field": fld,
            "event_type": etype,
        })


