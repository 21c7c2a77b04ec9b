"""Turn raw figures into what the report shows: suppression applied, charts drawn, text formatted.

Nothing that leaves this module carries an unsuppressed small-cell value: suppressed figures are
replaced by `Shown(..., suppressed=...)` whose `.shown` is None, and charts are drawn from the
suppressed values only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from alliance.report import charts
from alliance.report.data import JT_CATEGORIES, RawReport, add_months
from alliance.report.suppress import (
    PRIMARY,
    SECONDARY,
    Shown,
    is_small,
    suppress_categories,
    suppress_groups,
    suppress_rate,
    suppress_relations,
    suppress_rows,
    suppress_value,
)

JT_STYLE = {"recovered": "solid", "improved": "dots", "unchanged": "plain",
            "deteriorated": "hatch", "harmed": "grid"}


# A threshold of 1 suppresses nothing (every count >= 1) and 0 or less is meaningless.
MIN_CELL_FLOOR = 2


def validate_min_cell(value: object, setting: str = "min_cell") -> int:
    """The small-cell threshold as an int, or a ValueError naming the setting it came from."""
    try:
        ok = not isinstance(value, bool) and int(str(value).strip()) == float(str(value).strip())
        n = int(str(value).strip())
    except (TypeError, ValueError):
        ok, n = False, 0
    if not ok or n < MIN_CELL_FLOOR:
        raise ValueError(
            f"{setting}: {value!r} is not a valid small-cell threshold; use a whole number of at "
            f"least {MIN_CELL_FLOOR} (patients; default 11)")
    return n


def min_cell_from_env(default: int = 11) -> int:
    """The threshold from $ALLIANCE_MIN_CELL (validated), else the default."""
    raw = os.environ.get("ALLIANCE_MIN_CELL")
    return default if raw is None or raw.strip() == "" else validate_min_cell(raw, "ALLIANCE_MIN_CELL")


@dataclass(frozen=True)
class Options:
    """Report settings: the small-cell threshold and whether rate numerators are protected too."""

    min_cell: int = 11
    protect_numerators: bool = True

    def __post_init__(self) -> None:
        validate_min_cell(self.min_cell, "min_cell")


def fmt(v: Shown | float | int | None, kind: str = "n", digits: int = 1) -> str:
    """Text for a figure: 'suppressed' marker, '–' for no data, else the number (kind n, pct, dec)."""
    if isinstance(v, Shown):
        if v.is_suppressed:
            return "[s]"
        v = v.value
    if v is None:
        return "–"
    if kind == "pct":
        return f"{float(v):.{digits}f}%"
    if kind == "dec":
        return f"{float(v):.{digits}f}"
    if kind == "signed":
        return f"{float(v):+.{digits}f}"
    return f"{int(v):,}"


def _trend_floor(points: list[tuple[str, Shown | None]]) -> float:
    """Bottom of the SRS trend axis: 20, or lower in steps of 5 when a shown month is below 20
    (a clamped point would have been drawn at 20 with a label saying otherwise). Suppressed
    months do not move it, so the axis tells nothing about them."""
    shown = [float(p.shown) for _, p in points if p is not None and p.shown is not None]
    return float(min(20, 5 * math.floor(min(shown) / 5))) if shown else 20.0


def _bin_label(lo: float, hi: float) -> str:
    return f"{lo:g}–{hi:g}" if hi < 40 else f"{lo:g}–40"


def build(raw: RawReport, opts: Options) -> dict[str, Any]:
    """The template context: every figure suppressed as needed, every chart as inline SVG."""
    mc = opts.min_cell
    ctx: dict[str, Any] = {"raw_clinic": raw.clinic, "period": raw.period, "min_cell": mc,
                           "data_as_of": raw.data_as_of, "fmt": fmt}
    window = f"{add_months(raw.period.month, -(raw.period.window_months - 1)):%b %Y} – {raw.period.month:%b %Y}"
    ctx["window_label"] = window

    # Activity: one month. Rates rest on the patients who had appointments.
    if raw.activity:
        a = raw.activity
        # A month without an attended session (before the clinic's first, after its last): its
        # zeros rest on no patient, so there is nothing to suppress; the report says so instead
        # of showing [s] beside "0 active patients".
        idle = not a["active_patients"]
        if idle:
            last = a.get("last_active_month")
            ctx["idle_month"] = {"last_active": f"{last:%B %Y}" if last else None}
        ctx["activity"] = {
            "active_patients": Shown(a["active_patients"], a["active_patients"],
                                     PRIMARY if 0 < a["active_patients"] < mc else None),
            "sessions": Shown(0, 0) if idle else suppress_value(a["sessions"], a["active_patients"], mc),
            "attendance": Shown(None, 0) if not a["booked_patients"]
            else suppress_rate(a["sessions"], a["appointments"], mc, opts.protect_numerators)
            if a["booked_patients"] >= mc else Shown(None, a["booked_patients"], PRIMARY),
            # (no numerator protection: the report shows the sessions attended and, in the SRS
            # table's All column, the sessions with a score, so hiding their ratio hid nothing)
            "with_alliance": _completeness(a, "alliance", mc, False),
            "with_outcome": _completeness(a, "outcome", mc, opts.protect_numerators),
        }

    # Alliance trend: one point per month of the window, each resting on that month's patients.
    months = [add_months(raw.period.month, -i) for i in range(raw.period.window_months - 1, -1, -1)]
    by_month = {r["month"]: r for r in raw.trend}
    trend = []
    for mth in months:
        r = by_month.get(mth)
        trend.append((f"{mth:%b %y}", suppress_value(r["mean_srs"], r["patients"], mc) if r else None))
    ctx["trend"] = trend
    ctx["trend_svg"] = charts.line_trend(
        "chart-trend", "Mean SRS total by month",
        f"Mean Session Rating Scale total per month, {window}; dashed line: concern cutoff "
        f"{raw.srs_cutoff:g}. Months resting on fewer than {mc} patients are marked s.",
        trend, _trend_floor(trend), 40, raw.srs_cutoff, f"cutoff {raw.srs_cutoff:g}")

    # SRS distribution: bins sum to the sessions total and, below the cutoff, to the concern count.
    if raw.alliance is not None:
        al = raw.alliance
        bins = raw.srs_bins
        below = [i for i, b in enumerate(bins) if b["below_cutoff"]]
        above = [i for i, b in enumerate(bins) if not b["below_cutoff"]]
        reasons, hide = suppress_groups(
            [b["patients"] for b in bins], [list(range(len(bins))), below, above], mc)
        base_ok = al["srs_patients"] >= mc
        no_srs = not al["srs_patients"]  # no SRS this month: zeros, nothing to protect
        if not base_ok and not no_srs:
            reasons = [PRIMARY] * len(bins)
        concern_hidden = not base_ok or hide[0] or hide[1] or hide[2]
        if opts.protect_numerators:
            # rate x n gives the count back (e.g. 33.3% of 15 sessions = 5 concern sessions): a
            # small count of concern sessions or patients, or of their complement, hides the rate.
            k, n = al["concern_sessions"], al["srs_sessions"]
            concern_hidden = concern_hidden or any(is_small(v, mc) for v in (
                k, n - k, al.get("concern_patients"), al.get("no_concern_patients")))
        if concern_hidden and not no_srs:
            # The hidden concern count is the sum of the bars below the cutoff and the shown
            # total minus the bars above it: each side needs a hidden bar, or one subtraction
            # gives it back (the smallest non-zero bar of a side with none hidden).
            reasons = list(reasons)
            for side in (below, above):
                if side and all(reasons[i] is None for i in side):
                    j = min(side, key=lambda i: (bins[i]["sessions"] == 0, bins[i]["sessions"]))
                    reasons[j] = SECONDARY
        shown_bins = [Shown(b["sessions"], b["patients"], r) for b, r in zip(bins, reasons, strict=True)]
        ctx["srs_bins"] = [(_bin_label(b["lo"], b["hi"]), s, b["below_cutoff"])
                           for b, s in zip(bins, shown_bins, strict=True)]
        cut_idx = max(below) if below else None
        ctx["srs_hist_svg"] = charts.bars(
            "chart-srs-dist", "SRS totals this month against the concern cutoff",
            f"Number of sessions per band of SRS total in {raw.period.label}. Hatched bars are "
            f"below the concern cutoff {raw.srs_cutoff:g}; solid bars at or above it.",
            [charts.Bar(lbl, s, fmt(s), "hatch" if low else "solid")
             for lbl, s, low in ctx["srs_bins"]],
            horizontal=False, cutoff_after=cut_idx, cutoff_label=f"cutoff {raw.srs_cutoff:g}")
        ruptures = al.get("ruptures")
        # (a warehouse from before pending repairs: every rupture counted as decided)
        decided = al.get("ruptures_decided", ruptures)
        decided_patients = al.get("decided_patients", al.get("rupture_patients"))
        ctx["alliance"] = {
            "mean_srs": suppress_value(al["mean_srs"], al["srs_patients"], mc),
            "srs_sessions": Shown(al["srs_sessions"], al["srs_patients"],
                                  None if no_srs or (base_ok and not hide[0]) else PRIMARY),
            "pct_concern": Shown(None, 0) if no_srs else Shown(
                100.0 * al["concern_sessions"] / al["srs_sessions"], al["srs_patients"],
                PRIMARY if concern_hidden else None),
            "ruptures": None if ruptures is None else Shown(
                ruptures, al["rupture_patients"], PRIMARY if 0 < al["rupture_patients"] < mc else None),
            "pct_repaired": None if ruptures is None else Shown(None, 0) if not decided
            else suppress_rate(al["repaired"], decided, mc, opts.protect_numerators)
            if decided_patients >= mc else Shown(None, decided_patients, PRIMARY),
            # (ruptures still pending in the snapshot's data are left out of the repair rate; only
            # whether there are any is said, as a count of them could be a small cell)
            "ruptures_pending": None if ruptures is None else ruptures - decided > 0,
            "operator": raw.srs_operator,
            "cutoff": raw.srs_cutoff,
        }

    # Outcomes: categories per instrument, each a distribution summing to its shown total. The
    # row of the outcome instrument is suppressed together with the early-alliance bands below.
    linked_jt, ctx["early_bins"], early_ok = _jt_and_early_bands(raw, opts)
    if raw.jt is not None:
        jt_rows = []
        for row in raw.jt:
            if row["instrument"] in linked_jt:
                counts, total, pct = linked_jt[row["instrument"]]
            else:
                counts, total, pct = suppress_categories(row["counts"], mc)
            jt_rows.append({"instrument": row["instrument"], "counts": counts, "total": total, "pct": pct})
        ctx["jt"] = jt_rows
        # the configured outcome instrument's chart (assoc_outcome_instrument); the largest row
        # only when that instrument has none (it picked GAD-7 in months where it had more rows)
        main = next((r for r in jt_rows if r["instrument"] == raw.outcome_instrument), None) or max(
            jt_rows, key=lambda r: r["total"].value or 0, default=None)
        if main is not None:
            ctx["jt_main"] = main["instrument"]
            ctx["jt_svg"] = charts.bars(
                "chart-jt", f"Jacobson-Truax categories, {main['instrument']}",
                f"Share of closed episodes in each Jacobson-Truax category on {main['instrument']}, "
                f"episodes closed {window}. Each category has its own pattern.",
                [charts.Bar(c, main["pct"][c], f"{fmt(main['pct'][c], 'pct', 0)} ({fmt(main['counts'][c])})",
                            JT_STYLE[c]) for c in JT_CATEGORIES],
                v_max=100)
    if raw.nhstt is not None:
        n = raw.nhstt
        ctx["nhstt"] = {
            "eligible": n["eligible"], "cases": n["cases"],
            "recovery": suppress_rate(n["recovered"], n["cases"], mc, opts.protect_numerators),
            "improvement": suppress_rate(n["improved"], n["eligible"], mc, opts.protect_numerators),
            "deterioration": suppress_rate(n["deteriorated"], n["eligible"], mc, opts.protect_numerators),
        }
        ctx["nhstt_svg"] = charts.bars(
            "chart-nhstt", "NHS Talking Therapies outcomes",
            f"Recovery, reliable improvement and reliable deterioration rates for episodes closed {window}.",
            [charts.Bar("Recovery", ctx["nhstt"]["recovery"],
                        f"{fmt(ctx['nhstt']['recovery'], 'pct')} (n={fmt(ctx['nhstt']['recovery'].base) if not ctx['nhstt']['recovery'].is_suppressed else '[s]'})", "solid"),
             charts.Bar("Reliable improvement", ctx["nhstt"]["improvement"],
                        f"{fmt(ctx['nhstt']['improvement'], 'pct')}", "dots"),
             charts.Bar("Reliable deterioration", ctx["nhstt"]["deterioration"],
                        f"{fmt(ctx['nhstt']['deterioration'], 'pct')}", "hatch")],
            v_max=100)
    if raw.pre_post is not None:
        rng = {r["instrument"]: r for r in raw.instruments} if raw.instruments else {}
        pp = []
        for r in raw.pre_post:
            meta = rng.get(r["instrument"], {})
            lo = float(meta.get("total_min") or 0)
            hi = float(meta.get("total_max") or max(r["pre"] or 0, r["post"] or 0, 1))
            hib = bool(meta.get("higher_is_better")) if meta else False
            pp.append(charts.PrePost(r["instrument"], suppress_value(r["pre"], r["patients"], mc),
                                     suppress_value(r["post"], r["patients"], mc), lo, hi, hib))
        ctx["pre_post"] = [(p, r["patients"]) for p, r in zip(pp, raw.pre_post, strict=True)]
        ctx["pre_post_svg"] = charts.pre_post(
            "chart-prepost", "Mean first and last scores of closed episodes",
            f"For each outcome instrument, mean first score (circle) and mean last score (triangle) "
            f"of episodes closed {window}.", pp)
    if raw.sudden is not None:
        s = raw.sudden
        ctx["sudden"] = {
            "patients": Shown(s["patients"], s["patients"], PRIMARY if 0 < s["patients"] < mc else None),
            "gain": suppress_rate(s["with_gain"], s["patients"], mc, opts.protect_numerators),
            "loss": suppress_rate(s["with_loss"], s["patients"], mc, opts.protect_numerators),
        }

    # Alliance and outcome: early-alliance bands against % reliably improved, on the same outcome
    # instrument as the correlation (assoc_outcome_instrument), named on the chart.
    ctx["outcome_instrument"] = raw.outcome_instrument
    if early_ok:
        inst = raw.outcome_instrument
        ctx["early_svg"] = charts.bars(
            "chart-early", f"Reliable improvement on {inst} by early alliance",
            f"Share of closed episodes reliably improved on {inst}, by band of early alliance "
            f"(mean of the first three SRS totals), episodes closed {window}.",
            [charts.Bar(f"early SRS {lbl}", r, fmt(r, "pct", 0), "dots") for lbl, r, _ in ctx["early_bins"]],
            v_max=100)
    if raw.association is not None:
        rows = []
        for r in raw.association:
            label = str(r.get("scope") or r.get("level") or "overall")
            # Suppress on, and show, the n the CI rests on: for the between-therapist part that is
            # the number of therapists, not their patients (Baldwin, Wampold & Imel 2007).
            n_eff = r.get("n_effective", r.get("n"))
            est = suppress_value(r.get("r"), n_eff, mc)
            rows.append({"label": label, "est": est, "lo": r.get("ci_low"), "hi": r.get("ci_high"),
                         "n": n_eff, "part": r.get("part")})
        ctx["association"] = rows
        ctx["assoc_svg"] = charts.estimate_ci(
            "chart-assoc", "Early alliance and outcome: correlation with 95% CI",
            "Correlation of early alliance with residualised outcome change, with 95% confidence "
            "interval; dashed line: meta-analytic r = .28 (Flückiger et al. 2018).",
            [(r["label"], r["est"], None if r["est"].is_suppressed else r["lo"],
              None if r["est"].is_suppressed else r["hi"]) for r in rows],
            -1, 1, 0.28, "r = .28 (Flückiger 2018)")

    # Therapists: whole rows hidden below min_cell patients, plus the next smallest if only one.
    if raw.therapists is not None:
        ths = raw.therapists
        reasons, hide_total = suppress_rows([int(t["patients"] or 0) for t in ths], mc)
        rows = []
        for t, reason in zip(ths, reasons, strict=True):
            def cell(v: Any, reason: str | None = reason, t: dict[str, Any] = t) -> Shown:
                return Shown(v, int(t["patients"] or 0), reason)
            ri_base = int(t.get("outcome_patients") or 0)
            pct = t["pct_reliable_improvement"]
            if opts.protect_numerators and pct is not None and ri_base:
                # rate x n gives the count back: a small count (or complement) hides the rate.
                k = round(pct * ri_base / 100)
                if 0 < k < mc or 0 < ri_base - k < mc:
                    ri_base = 0
            rows.append({
                "therapist": t["therapist_id"],
                "patients": cell(t["patients"]),
                "sessions": cell(t["sessions"]),
                "mean_alliance": cell(t["mean_alliance"]),
                "pct_ri": cell(t["pct_reliable_improvement"]) if reason or ri_base >= mc
                else Shown(t["pct_reliable_improvement"], ri_base, PRIMARY),
                "es": cell(t["severity_adjusted_es"]) if reason or ri_base >= mc
                else Shown(t["severity_adjusted_es"], ri_base, PRIMARY),
                "suppressed": reason is not None,
            })
        total_p = sum(int(t["patients"] or 0) for t in ths)
        total_s = sum(int(t["sessions"] or 0) for t in ths)
        ctx["therapists"] = rows
        ctx["therapist_totals"] = {
            "patients": Shown(total_p, total_p, PRIMARY if hide_total[0] or 0 < total_p < mc else None),
            "sessions": Shown(total_s, total_p, PRIMARY if hide_total[0] or 0 < total_p < mc else None),
        }

    ctx["therapist_period"] = window if raw.therapists_windowed else "all time up to the snapshot"
    ctx["therapists_windowed"] = raw.therapists_windowed
    ctx["quarantine"] = raw.quarantine
    ctx["quarantine_unattributed"] = raw.quarantine_unattributed
    ctx["quarantine_by_received"] = raw.quarantine_by_received
    ctx["check_history"] = raw.check_history
    ctx["checks_latest"] = raw.checks_latest
    ctx["checks_period_end"] = raw.checks_period_end
    ctx["instruments"] = raw.instruments
    ctx["parameters"] = raw.parameters
    ctx["charts"] = [k for k in ctx if k.endswith("_svg")]
    return ctx


def _completeness(a: dict[str, Any], kind: str, mc: int, protect_numerators: bool) -> Shown:
    """% of attended sessions with a score: the mart's fraction when present, else counted.

    Rests on the month's patients; with protect_numerators also hidden when the sessions (or
    patients) with, or without, a score are a small count, since rate x sessions gives it back
    (93.8% of 16 sessions = 1 session without a score).
    """
    n = int(a["sessions"] or 0)
    frac = a.get(f"{kind}_completeness")
    if frac is not None:
        value: float | None = 100.0 * float(frac)
        k = round(float(frac) * n)
    else:
        k = int(a[f"with_{kind}"] or 0)
        value = 100.0 * k / n if n else None
    if value is None:
        return Shown(None, a["active_patients"])
    small = a["active_patients"] < mc or (protect_numerators and any(is_small(v, mc) for v in (
        k, n - k, a.get(f"patients_with_{kind}"), a.get(f"patients_without_{kind}"))))
    return Shown(value, a["active_patients"], PRIMARY if small else None)


def _jt_and_early_bands(
    raw: RawReport, opts: Options,
) -> tuple[dict[str, tuple[dict[str, Shown], Shown, dict[str, Shown]]],
           list[tuple[str, Shown, Shown]], bool]:
    """Suppress the outcome instrument's Jacobson-Truax row and the early-alliance bands together.

    Both rest on the instrument's episodes closed in the window, so published figures tie them:
    the band sizes sum to the Jacobson-Truax total, the bands' reliably improved counts (rate x
    band size) sum to recovered + improved, and their complements to unchanged + deteriorated +
    harmed. Each relation is a group for secondary suppression (`suppress_groups`), so that no
    hidden cell of either table is their difference from cells shown in the other.
    Returns ({instrument: (counts, total, pct)}, early-band rows (label, rate, size), bands shown).
    """
    mc, protect = opts.min_cell, opts.protect_numerators
    inst = raw.outcome_instrument
    bands = raw.early_bins or []
    jt_row = next((r for r in raw.jt or [] if r["instrument"] == inst), None)
    jt_counts = {c: int((jt_row or {}).get("counts", {}).get(c) or 0) for c in JT_CATEGORIES}
    jt_total = sum(jt_counts.values())
    nj, nb = len(JT_CATEGORIES), len(bands)
    j_idx = {c: i for i, c in enumerate(JT_CATEGORIES)}
    n_idx = [nj + i for i in range(nb)]  # band sizes
    r_idx = [nj + nb + i for i in range(nb)]  # band rates (improved counts)
    bases = (list(jt_counts.values()) + [int(b["patients"]) for b in bands]
             + [int(b["patients"]) for b in bands])
    primary = [jt_row is not None and (0 < jt_total < mc or is_small(v, mc))
               for v in jt_counts.values()]
    primary += [is_small(int(b["patients"]), mc) for b in bands]
    primary += [is_small(int(b["patients"]), mc) or (protect and int(b["patients"]) > 0 and (
        is_small(int(b["improved"]), mc) or is_small(int(b["patients"]) - int(b["improved"]), mc)))
        for b in bands]
    groups = [
        list(range(nj)),  # JT categories -> JT total
        n_idx,  # band sizes -> the same total
        r_idx + [j_idx["recovered"], j_idx["improved"]],  # improved per band -> R + I
        r_idx + [j_idx["unchanged"], j_idx["deteriorated"], j_idx["harmed"]],  # the complements
    ]
    linked = list(zip(n_idx, r_idx, strict=True))
    reasons, hide_total = suppress_groups(bases, groups, mc, primary=primary, linked=linked)
    # "Exactly one hidden cell per group" misses cells isolated by combining groups across the
    # two tables; check the relations exactly, with the shared total as a cell of its own.
    t_idx = len(bases)
    relations = [
        {**dict.fromkeys(range(nj), 1.0), t_idx: -1.0},
        {**dict.fromkeys(n_idx, 1.0), t_idx: -1.0},
        {**dict.fromkeys(r_idx, 1.0), j_idx["recovered"]: -1.0, j_idx["improved"]: -1.0},
    ]
    total_hidden = hide_total[0] or hide_total[1] or (jt_row is not None and 0 < jt_total < mc)
    reasons = suppress_relations(bases + [jt_total], relations,
                                 reasons + [PRIMARY if total_hidden else None],
                                 linked=linked, last_resort=[t_idx])
    total_hidden = reasons.pop() is not None

    linked_jt: dict[str, tuple[dict[str, Shown], Shown, dict[str, Shown]]] = {}
    if jt_row is not None:
        if 0 < jt_total < mc:
            counts = {c: Shown(v, v, PRIMARY) for c, v in jt_counts.items()}
            pct = {c: Shown(None, jt_total, PRIMARY) for c in JT_CATEGORIES}
            total = Shown(jt_total, jt_total, PRIMARY)
        else:
            counts = {c: Shown(v, v, reasons[j_idx[c]]) for c, v in jt_counts.items()}
            pct = {c: Shown(100.0 * v / jt_total if jt_total else None, jt_total, reasons[j_idx[c]])
                   for c, v in jt_counts.items()}
            total = Shown(jt_total, jt_total, PRIMARY if total_hidden else None)
        linked_jt[inst] = (counts, total, pct)

    rows = []
    for i, b in enumerate(bands):
        n = int(b["patients"])
        size = Shown(n, n, reasons[n_idx[i]])
        rate = Shown(100.0 * int(b["improved"]) / n if n else None, n, reasons[r_idx[i]])
        if rate.value is None and not rate.is_suppressed:
            rate = Shown(None, 0)
        rows.append((_bin_label(b["lo"], b["hi"]), rate, size))
    return linked_jt, rows, raw.early_bins is not None
