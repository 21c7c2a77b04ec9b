"""The clinic simulator's model: clinics, therapists, patients, episodes, sessions, questionnaires.

Everything here is deterministic for a seed: one `random.Random` drives the per-patient choices in a
fixed order, and numpy draws the latent alliance/outcome pairs per chunk of patients.
"""

from __future__ import annotations

import hashlib
import math
import random
import uuid
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

import numpy as np

# Observed r (the metric in docs/simulator.md) as a function of the latent episode-level correlation
# rho, measured at the default size and settings over several seeds: r_obs = R_AT_ZERO + SLOPE * rho.
# Measurement noise, dropout, the PHQ-9 floor, the SRS ceiling and the deteriorator tail attenuate
# rho; dropout after poor alliance and unrepaired ruptures add a small link even at rho = 0.
R_AT_ZERO = 0.020
SLOPE = 0.77

# SRS level = 40 - gap, gap log-normal (median, sigma on the alliance latent A), narrowing by
# SRS_GAP_NARROWING a session (at most 20%). Tuned so session totals have mean ~36, SD ~3-4 and
# ~30% below the 36 cutoff, as in published samples (Duncan et al. 2003; Campbell & Hemsley 2009).
SRS_GAP_MEDIAN = 3.0
SRS_GAP_SIGMA = 0.75
SRS_GAP_NARROWING = 0.03
SRS_LEVEL_MIN = 12.0
SRS_LEVEL_MAX = 39.2  # below the ceiling so session noise still shows (a room for repairs)
# PHQ-9 improvement by the planned end = IMPROVE_PER_INTAKE x intake + 4 G + IMPROVE_SHIFT.
IMPROVE_PER_INTAKE = 0.5
IMPROVE_SHIFT = -0.6
# ORS = ORS_AT_PHQ0 - 1.15 x PHQ-9 level + offset: intake mean ~19-20 (Miller et al. 2003).
ORS_AT_PHQ0 = 38.0
# Deteriorators: episodes whose outcome latent G is below the `deterioration_share` quantile of
# N(0, 1), the threshold raised by DET_RUPTURE_SHIFT SD after an unrepaired rupture. They worsen by
# DET_WORSENING[0] + DET_DEPTH_POINTS per SD below the threshold (at most DET_WORSENING[1]) PHQ-9
# points over the planned course, and leave more often (DET_DROPOUT_HAZARD per session) once 3+
# points worse. Services see ~5-10% reliable deterioration (Lambert 2013; NHS TT annual reports).
DET_RUPTURE_SHIFT = 0.7
DET_WORSENING = (6.0, 13.0)
DET_DEPTH_POINTS = 5.0
DET_DROPOUT_HAZARD = 0.05

INSTRUMENT_ITEMS = {"SRS": 4, "ORS": 4, "WAI-SR": 12, "PHQ-9": 9, "GAD-7": 7}
# Valid total ranges (schemas/instruments): a wrong reported total must stay inside them, so it is a
# mismatch the scoring flags, not a contract violation the ingest quarantines.
TOTAL_RANGE = {"SRS": (0, 40), "ORS": (0, 40), "WAI-SR": (12, 60), "PHQ-9": (0, 27), "GAD-7": (0, 21)}
AGE_GROUPS = (("adult", 0.85), ("adolescent", 0.10), ("child", 0.05))
REFERRALS = (("gp", 0.55), ("self", 0.30), ("specialist", 0.10), ("other", 0.05))
MODALITIES = (("in_person", 0.60), ("video", 0.30), ("phone", 0.10))
# Tang & DeRubeis (1999) as the R package suddengains applies it: two-tailed t at alpha .05 with
# df = n1 + n2 - 2 for 3+3, 3+2 (or 2+3) and 2+2 scores around the gain.
T_CRIT = {4: 2.776, 3: 3.182, 2: 4.303}


@dataclass
class SimParams:
    """Every knob of the simulator, recorded verbatim in the ground truth."""

    clinics: int = 3
    patients: int = 1500
    seed: int = 42
    start: date = date(2025, 1, 6)
    months: int = 18
    therapists_per_clinic: int = 10
    gzip: bool = False
    bad_share: float = 0.01
    alliance_outcome_r: float = 0.28
    events_target: int | None = None
    outcome_interval: int = 1  # PHQ-9 and GAD-7 every n-th attended session (and at session 1)
    wai_interval: int = 4  # WAI-SR at attended sessions 3, 3 + n, 3 + 2n, ...
    therapist_alliance_share: float = 0.10  # share of alliance variance between therapists
    therapist_outcome_share: float = 0.05  # share of residual outcome variance between therapists
    second_episode_share: float = 0.10  # planned endings followed by a re-referral
    rupture_share: float = 0.35  # of episodes planned for 8+ sessions
    rupture_repair_share: float = 0.60
    sudden_gain_share: float = 0.35  # of eligible episodes (large planned improvement)
    late_share: float = 0.02  # events exported 1-10 days after their day
    amend_share: float = 0.01  # questionnaires later corrected by questionnaire.amended
    retract_share: float = 0.005  # extra erroneous questionnaires later retracted
    missing_questionnaire_share: float = 0.05
    missing_item_share: float = 0.02
    reported_total_share: float = 0.20
    wrong_total_share: float = 0.05  # of reported totals
    free_text_share: float = 0.01  # events carrying a non-allow-listed clinician_note
    dropout_hazard: float = 0.022  # per attended session, at average alliance
    deterioration_share: float = 0.11  # lowest tail of the outcome latent G: worsen, not improve
    utc_offsets: tuple[str, ...] = ("+00:00", "+01:00", "+02:00")
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["start"] = self.start.isoformat()
        d["utc_offsets"] = list(self.utc_offsets)
        return d


def add_months(d: date, months: int) -> date:
    y, m = divmod(d.month - 1 + months, 12)
    year, month = d.year + y, m + 1
    days_in = [31, 29 if (year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)) else 28, 31, 30,
               31, 30, 31, 31, 30, 31, 30, 31][month - 1]
    return date(year, month, min(d.day, days_in))


def _pick(rng: random.Random, table: tuple[tuple[str, float], ...]) -> str:
    x = rng.random()
    for value, p in table:
        x -= p
        if x < 0:
            return value
    return table[-1][0]


def latent_pairs(n: int, rho: float, ta: np.ndarray, tg: np.ndarray, share_a: float,
                 share_g: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Alliance (A) and outcome (G) latents with sample correlation exactly `rho`.

    `ta`/`tg` are the therapist effects of each row. Fixing the in-sample correlation removes the
    latent sampling error, so the observed r varies across seeds only by measurement noise.
    """
    u = rng.standard_normal(n)
    w = rng.standard_normal(n)
    a = math.sqrt(share_a) * ta + math.sqrt(1 - share_a) * u
    v = math.sqrt(share_g) * tg + math.sqrt(1 - share_g) * w
    if n < 3:
        return a, rho * a + math.sqrt(1 - rho * rho) * v
    az = (a - a.mean()) / a.std()
    vc = v - v.mean()
    vperp = vc - az * (vc @ az) / (az @ az)
    vz = vperp / vperp.std()
    return az, rho * az + math.sqrt(1 - rho * rho) * vz


def split_decimal(total: float, n: int, rng: random.Random) -> list[float]:
    """Split a 0..10n total into n items of 0.0-10.0 with one decimal (SRS, ORS)."""
    base = total / n
    room = min(1.0, (10.0 - base) / 0.35, base / 0.35) if 0 < base < 10 else 0.0
    rnd = rng.random
    devs = [0.6 * rnd() - 0.3 for _ in range(n)]
    mean = sum(devs) / n
    return [min(10.0, max(0.0, round(base + (d - mean) * room, 1))) for d in devs]


def split_integer(total: int, n: int, lo: int, hi: int, rng: random.Random) -> list[int]:
    """Split an integer total into n integer items in lo..hi that add up to it exactly."""
    total = max(n * lo, min(n * hi, total))
    q, r = divmod(total - n * lo, n)
    items = [lo + q + 1] * r + [lo + q] * (n - r)
    # Move mass between random items so answers are not flat, keeping the sum.
    rnd = rng.random
    for _ in range(n // 2 + 1):
        i, j = int(rnd() * n), int(rnd() * n)
        if i != j and items[i] < hi and items[j] > lo:
            items[i] += 1
            items[j] -= 1
    return items


def tang_derubeis(series: dict[int, float], n: int, cutoff: float) -> bool:
    """True when a sudden gain between measurements n and n+1 meets Tang & DeRubeis (1999).

    `series` maps session number to score (lower is better). Criteria as in suddengains: gain >=
    cutoff, gain >= 25% of the pre-gain score, and mean(up to 3 before) - mean(up to 3 after) >
    t_crit * pooled SD, with at least 2 scores on each side.
    """
    if n not in series or n + 1 not in series:
        return False
    pre, post = series[n], series[n + 1]
    gain = pre - post
    if gain < cutoff or pre <= 0 or gain < 0.25 * pre:
        return False
    before = [series[s] for s in (n - 2, n - 1, n) if s in series]
    after = [series[s] for s in (n + 1, n + 2, n + 3) if s in series]
    if len(before) < 2 or len(after) < 2:
        return False
    n1, n2 = len(before), len(after)
    m1, m2 = sum(before) / n1, sum(after) / n2
    v1 = sum((x - m1) ** 2 for x in before) / (n1 - 1)
    v2 = sum((x - m2) ** 2 for x in after) / (n2 - 1)
    pooled = math.sqrt(((n1 - 1) * v1 + (n2 - 1) * v2) / (n1 + n2 - 2))
    return m1 - m2 > T_CRIT[n1 + n2 - 2] * pooled


# RFC 4122 variant bits for the first hex digit of the fourth group.
_VARIANT = {f"{i:x}": f"{(i & 0x3) | 0x8:x}" for i in range(16)}


class IdMaker:
    """uuid5 event ids from the seed and a running counter: unique, stable, and free of raw ids.

    Same value as `uuid.uuid5(self.ns, str(n))`, computed from a pre-hashed namespace (about 3x
    faster, which matters at 10^7 events).
    """

    def __init__(self, seed: int) -> None:
        self.ns = uuid.uuid5(uuid.NAMESPACE_URL, f"alliance-simulator/seed/{seed}")
        self._base = hashlib.sha1(self.ns.bytes, usedforsecurity=False)
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        h = self._base.copy()
        h.update(str(self.n).encode())
        x = h.hexdigest()
        return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT[x[16]]}{x[17:20]}-{x[20:32]}"
